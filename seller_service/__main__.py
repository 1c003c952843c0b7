"""`python -m seller_service`: run the seller service."""

from seller_service.service import service

if __name__ == "__main__":
    service.main()
