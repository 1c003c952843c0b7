"""`python -m inventory_service`: run the inventory service."""

from inventory_service.service import service

if __name__ == "__main__":
    service.main()
