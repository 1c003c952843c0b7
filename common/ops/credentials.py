"""The order API's bearer tokens, as its clients (`shop order`, `shop doctor`) send them.

The service reads the same two variables (`OrderSettings`) and checks them; a client sends
what its environment holds, so one environment serves both.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The variables holding the tokens (their names, not secrets: hence the noqa).
API_TOKEN_VAR = "SHOP_API_TOKEN"  # noqa: S105
OPERATOR_TOKEN_VAR = "SHOP_OPERATOR_TOKEN"  # noqa: S105


def blank_is_unset(value: object) -> object:
    """A token variable set but empty (`SHOP_API_TOKEN=` in a compose file) is no token;
    surrounding whitespace (a token read from a file with its newline) is not part of it."""
    if isinstance(value, str):
        return value.strip() or None
    return value


class ApiCredentials(BaseSettings):
    """The tokens in a client's environment (un-prefixed, shared with the service)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    api_token: SecretStr | None = Field(None, validation_alias=AliasChoices(API_TOKEN_VAR))
    operator_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices(OPERATOR_TOKEN_VAR))

    _blank = field_validator("api_token", "operator_token", mode="before")(blank_is_unset)

    def headers(self, *, operator: bool = False) -> dict[str, str]:
        """The Authorization header for a request: the operator token for an operator
        action; otherwise the API token, or the operator token, which the API accepts too."""
        token = self.operator_token if operator else (self.api_token or self.operator_token)
        if token is None:
            return {}
        return {"Authorization": f"Bearer {token.get_secret_value()}"}

    def variable(self, *, operator: bool = False) -> str:
        """The variable a request's token comes from, to tell the user what to set."""
        if operator or (self.api_token is None and self.operator_token is not None):
            return OPERATOR_TOKEN_VAR
        return API_TOKEN_VAR
