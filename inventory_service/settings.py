"""The inventory service's configuration, from the environment."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.kit.settings import ServiceSettings


class InventorySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="INVENTORY_", extra="ignore",
                                      populate_by_name=True)
    service_name: ClassVar[str] = "inventory"

    metrics_port: int = Field(9101, ge=0, le=65535,
                              description="Port of the Prometheus /metrics endpoint; 0: off.")

    seed_catalogue: bool = Field(True, description="Load the demo catalogue into an empty stock.")
