"""`python -m logistics_service`: run the logistics service."""

from logistics_service.service import service

if __name__ == "__main__":
    service.main()
