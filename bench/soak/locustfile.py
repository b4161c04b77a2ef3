"""The soak's clients (locust): recommend, observe, feedback and catalogue changes against one server.

Started by ``bench/soak/run_soak.py`` (which also swaps the bundle every 10 s); not meant to be run alone,
but it can be: ``SOAK_TOKEN=... locust -f bench/soak/locustfile.py --headless -H http://127.0.0.1:8000``.

Every request is designed to be valid whatever bundle serves it, so any non-2xx answer is an error:

- users are ``u-0`` .. ``u-{SOAK_USERS-1}`` (both bundles know them) and a bounded set of cold users
  ``soak-new-<n>`` that no bundle knows (cold start, then folded in once they observe);
- observe / feedback name only items every bundle holds (``sku-0000`` .. ``sku-{SOAK_SHARED_ITEMS-1}``,
  the smaller bundle's whole catalogue) or the client's own added items while they are added (the engine
  re-applies added items to each new version by key, so they survive swaps); feedback prefers an item of
  the client's last answer (with its request id) when that item is one of those;
- catalogue changes: each client owns a pool of keys ``soak-c<client>-<n>`` that it adds (with a vector of
  the retrieval dimension, both bundles' dimension) and removes in turn, and one shared-range item
  (``sku-{SOAK_SHARED_ITEMS-20+client}``) that it removes and adds back; the catalogue stays bounded.

Beyond status codes, each /recommend answer is checked against the removals: an item whose removal had
been acknowledged before the request was sent, and which no client has started to add back since, must
not appear (counted as ``stale_removed``, reported as a failure of the answer).

Raw latencies (exact, not locust's rounded buckets), statuses and error bodies go to the JSON file named by
``SOAK_RAW`` when the test stops.
"""
from __future__ import annotations

import json
import os
import random
import time
from collections import defaultdict

from locust import FastHttpUser, constant, events, task

TOKEN = os.environ.get("SOAK_TOKEN", "")
N_USERS = int(os.environ.get("SOAK_USERS", "2000"))
SHARED = int(os.environ.get("SOAK_SHARED_ITEMS", "600"))
DIM = int(os.environ.get("SOAK_DIM", "32"))
POOL = int(os.environ.get("SOAK_POOL", "8"))
COLD_USERS = int(os.environ.get("SOAK_COLD_USERS", "200"))
WAIT_MS = float(os.environ.get("SOAK_WAIT_MS", "0"))
RAW = os.environ.get("SOAK_RAW")
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
DEVICES = ("ios", "android", "web")

# ---------------------------------------------------------------- shared state (one process, greenlets)
_client_ids = iter(range(10_000))
# item key -> ("added" | "adding" | "removed" | "removing", perf_counter time the state was reached)
ITEM_STATE: dict[str, tuple[str, float]] = {}
RAW_LOG: dict[str, list] = defaultdict(list)   # endpoint -> [[t_start_s, latency_ms, status, failed], ...]
ERRORS: dict[str, list] = defaultdict(list)           # endpoint -> first error descriptions
CHECKS = {"stale_removed": 0, "stale_examples": [], "answers_checked": 0,
          # events the server acknowledged (2xx), by kind: the event store must hold at least these
          "acked": {"impression": 0, "click": 0, "conversion": 0, "rating": 0, "item_added": 0, "item_removed": 0}}
T0 = time.time()


def _shared_key(i: int) -> str:
    return f"sku-{i:04d}"


@events.request.add_listener
def _on_request(request_type, name, response_time, response_length, response=None, exception=None,
                context=None, start_time=None, url=None, **_kw):
    status = getattr(response, "status_code", 0) if response is not None else 0
    t = (start_time if start_time is not None else time.time()) - T0
    RAW_LOG[name].append([round(t, 4), round(float(response_time), 4), int(status or 0), int(exception is not None)])
    if exception is not None and len(ERRORS[name]) < 20:
        body = ""
        try:
            body = (response.text or "")[:300] if response is not None else ""
        except Exception:  # noqa: BLE001 - a body we cannot decode is still reported by its status
            body = "<undecodable>"
        ERRORS[name].append({"t": round(t, 3), "status": status, "error": str(exception)[:300], "body": body})


@events.test_stop.add_listener
def _dump(environment, **_kw):
    if not RAW:
        return
    with open(RAW, "w") as f:
        json.dump({"requests": RAW_LOG, "errors": ERRORS, "checks": CHECKS, "t0": T0}, f)


class SoakClient(FastHttpUser):
    wait_time = constant(WAIT_MS / 1e3)
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self):
        self.cid = next(_client_ids)
        self.rng = random.Random(1000 + self.cid)
        self.pool = [f"soak-c{self.cid}-{n}" for n in range(POOL)]
        self.added: list[str] = []                  # own pool keys now in the catalogue
        self.own_shared = _shared_key(SHARED - 20 + self.cid % 20)
        self.own_shared_removed = False
        self.last: tuple[str, str, list] | None = None    # (user, request id, items) of the last answer

    # ------------------------------------------------------------ helpers
    def _post(self, path: str, body: dict, name: str | None = None):
        with self.client.post(path, data=json.dumps(body), headers=HEADERS, name=name or path,
                              catch_response=True) as r:
            if not 200 <= r.status_code < 300:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return r, None
            try:
                out = r.json()
            except Exception as e:  # noqa: BLE001
                r.failure(f"not JSON: {e}")
                return r, None
            return r, out

    def _user(self) -> str:
        if self.rng.random() < 0.05:
            return f"soak-new-{self.rng.randrange(COLD_USERS)}"
        return f"u-{self.rng.randrange(N_USERS)}"

    def _valid_item(self) -> str:
        if self.added and self.rng.random() < 0.2:
            return self.rng.choice(self.added)
        return _shared_key(self.rng.randrange(SHARED))

    # ------------------------------------------------------------ tasks
    @task(10)
    def recommend(self):
        user = self._user()
        body = {"user": user, "k": 10, "context": {"hour": self.rng.randrange(24),
                                                    "device": self.rng.choice(DEVICES)}}
        sent = time.perf_counter()
        with self.client.post("/recommend", data=json.dumps(body), headers=HEADERS, name="/recommend",
                              catch_response=True) as r:
            if not 200 <= r.status_code < 300:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return
            try:
                out = r.json()
                items = out["items"]
                rid = out["request_id"]
            except Exception as e:  # noqa: BLE001
                r.failure(f"bad answer: {e}")
                return
            CHECKS["answers_checked"] += 1
            CHECKS["acked"]["impression"] += 1
            stale = [k for k in items if ITEM_STATE.get(k, ("", 0.0))[0] == "removed"
                     and ITEM_STATE[k][1] < sent]
            if stale:
                CHECKS["stale_removed"] += 1
                if len(CHECKS["stale_examples"]) < 20:
                    CHECKS["stale_examples"].append({"user": user, "items": items, "stale": stale,
                                                     "version": out.get("version")})
                r.failure(f"answer holds removed items {stale}")
                return
            self.last = (user, rid, items)

    @task(3)
    def observe(self):
        n = self.rng.randint(1, 3)
        items = list(dict.fromkeys(self._valid_item() for _ in range(n)))
        _, out = self._post("/observe", {"user": self._user(), "items": items})
        if out is not None:
            CHECKS["acked"]["click"] += len(items)

    @task(3)
    def feedback(self):
        body: dict = {}
        if self.last is not None and self.rng.random() < 0.8:
            user, rid, shown = self.last
            ok = [k for k in shown if (k.startswith("sku-") and int(k[4:]) < SHARED) or k in self.added]
            if ok:
                body = {"user": user, "item": self.rng.choice(ok), "request_id": rid}
        if not body:
            body = {"user": self._user(), "item": self._valid_item()}
        kind = self.rng.choices(("click", "conversion", "rating"), (6, 2, 2))[0]
        body["kind"] = kind
        if kind == "conversion":
            body["value"] = round(self.rng.uniform(1, 100), 2)
        elif kind == "rating":
            body["value"] = float(self.rng.randint(1, 5))
        _, out = self._post("/feedback", body)
        if out is not None:
            CHECKS["acked"][kind] += 1

    @task(1)
    def add_items(self):
        free = [k for k in self.pool if k not in self.added]
        keys = self.rng.sample(free, min(len(free), self.rng.randint(1, 3)))
        if self.own_shared_removed and self.rng.random() < 0.5:
            keys.append(self.own_shared)
        if not keys:
            return
        items = [{"key": k, "vector": [round(self.rng.gauss(0, 0.3), 5) for _ in range(DIM)]} for k in keys]
        for k in keys:
            ITEM_STATE[k] = ("adding", time.perf_counter())
        _, out = self._post("/items", {"items": items})
        if out is not None:
            CHECKS["acked"]["item_added"] += len(keys)
            for k in keys:
                ITEM_STATE[k] = ("added", time.perf_counter())
                if k == self.own_shared:
                    self.own_shared_removed = False
                else:
                    self.added.append(k)
        # a failed add leaves the keys "adding": never checked as removed, never observed

    @task(1)
    def remove_items(self):
        keys = self.rng.sample(self.added, min(len(self.added), self.rng.randint(1, 2)))
        if not self.own_shared_removed and self.rng.random() < 0.3:
            keys.append(self.own_shared)
        if not keys:
            return
        for k in keys:                      # from here on the item may or may not be served: not observed
            ITEM_STATE[k] = ("removing", time.perf_counter())
            if k in self.added:
                self.added.remove(k)
        _, out = self._post("/items/remove", {"items": keys})
        if out is not None:
            CHECKS["acked"]["item_removed"] += len(keys)
            done = time.perf_counter()
            for k in keys:
                ITEM_STATE[k] = ("removed", done)
                if k == self.own_shared:
                    self.own_shared_removed = True
