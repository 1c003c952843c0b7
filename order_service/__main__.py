"""`python -m order_service`: run the order service, its consumers and its HTTP API."""

from order_service.service import service

if __name__ == "__main__":
    service.main()
