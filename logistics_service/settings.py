"""The logistics service's configuration, from the environment."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.kit.settings import ServiceSettings


class LogisticsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LOGISTICS_", extra="ignore",
                                      populate_by_name=True)
    service_name: ClassVar[str] = "logistics"

    metrics_port: int = Field(9102, ge=0, le=65535,
                              description="Port of the Prometheus /metrics endpoint; 0: off.")
