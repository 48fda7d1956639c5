"""`recsys simulate`: a crowd of simulated shoppers (training/simulate.py) against the live
service over HTTP: each asks POST /recommend, decides by the truth what to click and buy, and
sends those events to POST /events with the request_id and position that caused them."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from training.generate import Truth
from training.simulate import (
    ANSWER_SCHEMA,
    REQUESTS_PER_VISIT,
    ShopperModel,
    Shoppers,
    decide,
    draw_shoppers,
    shopper_events,
    summarise,
)

# A 429 or 503 is retried after its Retry-After, at most this long and this many times.
MAX_RETRY_AFTER = 30.0
MAX_RETRIES = 8


class SimulationError(RuntimeError):
    """The service cannot be simulated against as asked (unreachable, refused, wrong contract)."""


@dataclass(frozen=True)
class SimulationConfig:
    url: str
    users: int = 100
    seed: int = 0
    new_users: int = 0
    requests_per_user: int = REQUESTS_PER_VISIT
    k: int = 10
    # False asks for items the shopper has seen too: the generator's shoppers re-view items as
    # readily as new ones, so leaving them out costs a ranker clicks under this truth.
    exclude_seen: bool = True
    concurrency: int = 8
    api_key: str | None = None
    timeout: float = 30.0


@dataclass
class SimulationResult:
    """The answers (one row per /recommend answer, ANSWER_SCHEMA), what /events said, how many
    requests got no 2xx answer (by route and status, or the transport error: a read timeout)
    and how often a 429/503 was waited out."""

    answers: pl.DataFrame
    events_sent: int = 0
    events_accepted: int = 0
    events_duplicates: int = 0
    events_rejected: int = 0
    non_2xx: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    seconds: float = 0.0

    @property
    def summary(self) -> pl.DataFrame:
        return summarise(self.answers)

    def as_dict(self) -> dict[str, Any]:
        return {
            "variants": self.summary.to_dicts(),
            "events": {
                "sent": self.events_sent,
                "accepted": self.events_accepted,
                "duplicates": self.events_duplicates,
                "rejected": self.events_rejected,
            },
            "non_2xx": sum(self.non_2xx.values()),
            "non_2xx_by_status": dict(sorted(self.non_2xx.items())),
            "retries": self.retries,
            "seconds": round(self.seconds, 3),
        }


class _Run:
    def __init__(self, config: SimulationConfig, shoppers: Shoppers) -> None:
        self.config = config
        self.shoppers = shoppers
        self.model = shoppers.model
        self.rows: list[tuple] = []
        self.result = SimulationResult(pl.DataFrame(schema=ANSWER_SCHEMA))
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.client = httpx.AsyncClient(
            base_url=config.url.rstrip("/"),
            headers=headers,
            timeout=config.timeout,
            limits=httpx.Limits(max_connections=config.concurrency),
        )

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The JSON of a 2xx answer; None (counted) for another status. Waits out 429 and 503
        by their Retry-After; refusals of the key and an unreachable service end the run."""
        for _attempt in range(MAX_RETRIES + 1):
            try:
                response = await self.client.post(path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise SimulationError(
                    f"cannot reach the service at {self.config.url} ({type(exc).__name__}: "
                    f"{exc}); is it running (`recsys serve`)?"
                ) from exc
            except httpx.TransportError as exc:
                # A read timeout or a dropped connection fails this request, not the run.
                self.result.non_2xx[f"{path} {type(exc).__name__}"] += 1
                return None
            status = response.status_code
            if status < 300:
                return response.json()
            if status in (401, 403):
                raise SimulationError(
                    f"{path} answered {status} ({_error_text(response)}): pass --api-key with a "
                    "key that has the read and ingest scopes"
                )
            if status in (429, 503):
                self.result.retries += 1
                await asyncio.sleep(_retry_after(response))
                continue
            if status == 422 and path == "/events":
                raise SimulationError(
                    f"/events refused the shoppers' events ({_error_text(response)}); a service "
                    "whose event contract lacks request_id and position cannot take them"
                )
            self.result.non_2xx[f"{path} {status}"] += 1
            return None
        self.result.non_2xx[f"{path} {status}"] += 1
        return None

    async def shopper(self, index: int) -> None:
        rng = self.shoppers.rngs[index]
        row = int(self.shoppers.rows[index])
        user_id = str(self.model.user_ids[row])
        session_id = f"sim{self.shoppers.seed}-{index}"
        for _ in range(self.config.requests_per_user):
            answer = await self.post(
                "/recommend",
                {"user_id": user_id, "k": self.config.k, "exclude_seen": self.config.exclude_seen},
            )
            if answer is None:
                continue
            item_ids = [item["item_id"] for item in answer["items"]]
            items = self.model.item_index(item_ids)
            odds = self.model.odds([row] * len(item_ids), items, list(range(len(item_ids))))
            decisions = decide(odds, rng)
            price = self.model.price[items.clip(0)] * (items >= 0)
            revenue = float((price * decisions.quantity * decisions.purchase).sum())
            self.rows.append(
                (
                    index,
                    user_id,
                    answer["request_id"],
                    answer["variant"],
                    len(item_ids),
                    int(decisions.click.sum()),
                    int(decisions.cart.sum()),
                    int(decisions.purchase.sum()),
                    revenue,
                )
            )
            events = shopper_events(
                user_id, item_ids, decisions, answer["request_id"], time.time(), session_id
            )
            if events:
                await self.send(events)

    async def send(self, events: list[dict[str, Any]]) -> None:
        self.result.events_sent += len(events)
        answer = await self.post("/events", {"events": events})
        if answer is not None:
            self.result.events_accepted += int(answer["accepted"])
            self.result.events_duplicates += int(answer["duplicates"])
            self.result.events_rejected += len(answer["rejected"])

    async def run(self, on_done: Callable[[], None] | None) -> SimulationResult:
        started = time.perf_counter()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(len(self.shoppers.rows)):
            queue.put_nowait(index)

        async def worker() -> None:
            while True:
                try:
                    index = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self.shopper(index)
                if on_done is not None:
                    on_done()

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(max(1, self.config.concurrency)):
                    group.create_task(worker())
        except* SimulationError as errors:
            raise errors.exceptions[0] from None
        finally:
            await self.client.aclose()
        self.result.answers = pl.DataFrame(self.rows, schema=ANSWER_SCHEMA, orient="row").sort(
            "shopper", maintain_order=True
        )
        self.result.seconds = time.perf_counter() - started
        return self.result


def _retry_after(response: httpx.Response) -> float:
    try:
        seconds = float(response.headers.get("Retry-After", "1"))
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.05), MAX_RETRY_AFTER)


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text[:200]))
    except ValueError:
        return response.text[:200]


def simulate(
    truth: Truth | ShopperModel | Path,
    config: SimulationConfig,
    on_done: Callable[[], None] | None = None,
) -> SimulationResult:
    """Run `config.users` shoppers of `truth` (a folder, a Truth or a ShopperModel) against the
    service at `config.url`; `on_done` is called after each shopper (a progress bar)."""
    if isinstance(truth, Path | str):
        truth = Truth.read(Path(truth))
    model = truth if isinstance(truth, ShopperModel) else ShopperModel(truth)
    if config.requests_per_user < 1 or config.concurrency < 1 or not 1 <= config.k <= 100:
        raise ValueError("need --requests-per-user >= 1, --concurrency >= 1 and 1 <= --k <= 100")
    shoppers = draw_shoppers(model, config.users, config.seed, config.new_users)
    return asyncio.run(_Run(config, shoppers).run(on_done))
