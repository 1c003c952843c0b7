# One image for every service; docker-compose.yml picks the service with `command`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The services run as a user of their own, not as root.
RUN groupadd --system shop && useradd --system --gid shop --home-dir /app --no-create-home shop

WORKDIR /app

# Install the project (not its dev extra) from a copy of the sources, then drop the copy:
# the installed packages are all the services need at run time. .dockerignore lets only
# pyproject.toml, the kit and the service packages (`*_service`) in.
COPY . /tmp/src
RUN pip install /tmp/src && rm -rf /tmp/src

# The default SQLite files live here; a named volume keeps them across restarts. The folder
# exists and belongs to the service user before the volume is mounted, so Docker copies that
# ownership into a new volume.
RUN mkdir -p /app/data && chown shop:shop /app/data
ENV SHOP_DATA_DIR=/app/data
VOLUME ["/app/data"]

USER shop
EXPOSE 8000
CMD ["shop", "--help"]
