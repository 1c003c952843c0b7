"""The order service's configuration, from the environment."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings


class OrderSettings(ServiceSettings):
    """The order service: its database, its HTTP API."""

    model_config = SettingsConfigDict(env_prefix="ORDER_", extra="ignore", populate_by_name=True)
    service_name: ClassVar[str] = "order"

    metrics_port: int = Field(9100, ge=0, le=65535,
                              description="Port of the Prometheus /metrics endpoint; 0: off.")

    http_host: str = Field("127.0.0.1", description="Where the HTTP API listens.")
    http_port: int = Field(8000, ge=1, le=65535, description="The HTTP API's port.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest accepted request body.")
    late_after: float = Field(
        30.0, gt=0, description="Seconds an expected subscriber has to answer an order before "
                                "it is reported late (ORDER_LATE_AFTER).")
