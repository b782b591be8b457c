"""`GET /v1/admin/usage`: token usage per period, tenant, key and model, from the usage actor (admins only).

Dates are UTC calendar days, `from` and `to` inclusive; `group_by` sums rows per `day`, `month` or over
the whole range (`total`). Settled requests appear at once; running ones when they end.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.access.usage import GroupBy
from serve_app.access.usage_client import UsageBook, UsageUnavailable
from serve_app.ingress.errors import RETRY_AFTER_S
from serve_app.ingress.protocol import OpenAIError


class UsageQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    tenant: str | None = None
    key: str | None = Field(None, description="The caller's subject, e.g. `api-key:<name>` for an API key.")
    model: str | None = None
    start: date | None = Field(None, alias="from", description="First UTC day (YYYY-MM-DD), inclusive.")
    end: date | None = Field(None, alias="to", description="Last UTC day (YYYY-MM-DD), inclusive.")
    group_by: GroupBy = "day"

    @model_validator(mode="after")
    def _ordered(self) -> UsageQuery:
        if self.start and self.end and self.start > self.end:
            raise ValueError("'from' is after 'to'")
        return self


UsageParams = Annotated[UsageQuery, Query()]


class UsageRow(BaseModel):
    period: str = Field(description="YYYY-MM-DD, YYYY-MM, or empty for group_by=total.")
    tenant: str
    key: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageReport(BaseModel):
    object: str = "list"
    group_by: GroupBy
    data: list[UsageRow]


async def usage_report(book: UsageBook, query: UsageQuery) -> UsageReport:
    try:
        rows: list[dict[str, Any]] = await book.query(query.tenant, query.key, query.model, query.start, query.end,
                                                      query.group_by)
    except UsageUnavailable:
        raise OpenAIError(503, "Usage accounting is temporarily unavailable. Retry shortly.", type="server_error",
                          code="usage_unavailable", headers={"Retry-After": RETRY_AFTER_S}) from None
    return UsageReport(group_by=query.group_by, data=[UsageRow(**row) for row in rows])
