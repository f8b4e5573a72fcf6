"""`GET /v1/metrics` of a real `snapship server` (issue 15, item 6): what the test did, counted.

The reply is parsed with prometheus_client's own parser; its values are checked against the
requests the test made (byte counts to the byte, refusals by role, gc and verify results as
their reports said). Any token but an admin token for every repository is refused.
"""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from snapship.errors import PermissionDenied
from snapship.server.policy import Role
from tests.serverproc import (
    STANDARD_TOKENS,
    ServerProc,
    create_repo_fast_kdf,
    http_storage,
    write_tokens,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
TOKENS = (*STANDARD_TOKENS, ("ops-r1", Role.ADMIN, frozenset({"r1"})))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServerProc, dict[str, str]]]:
    tokens = write_tokens(tmp_path / "tokens", TOKENS)
    with ServerProc(tmp_path / "root", tmp_path / "tokens") as server:
        yield server, tokens


def get(server: ServerProc, path: str, token: str | None) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def scrape(server: ServerProc, token: str) -> Samples:
    status, ctype, text = get(server, "/v1/metrics", token)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, text)
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_what_was_done_and_only_admins_read_them(
        served: tuple[ServerProc, dict[str, str]]) -> None:
    server, tokens = served
    admin = http_storage(server, "m", tokens["ops"])
    create_repo_fast_kdf(admin)
    before = scrape(server, tokens["ops"])

    # Bytes in and out, exactly: an admin stores an object and reads it back twice.
    body = os.urandom(123_457)
    admin.put("protected/disk/20260101-000000.000-abcd", body)
    assert admin.get("protected/disk/20260101-000000.000-abcd") == body
    assert admin.get("protected/disk/20260101-000000.000-abcd") == body
    # Refusals: a backup token deletes twice, a read token writes once, nobody's token once.
    backup = http_storage(server, "m", tokens["db1-backup"], retry_time=0)
    for _ in range(2):
        with pytest.raises(PermissionDenied, match="admin token"):
            backup.delete("protected/disk/20260101-000000.000-abcd")
    with pytest.raises(PermissionDenied):
        http_storage(server, "m", tokens["restorer"], retry_time=0).put(
            "protected/disk/20260101-000000.000-abce", b"x")
    assert get(server, "/v1/repos/m", "not-a-token")[0] == 401
    after = scrape(server, tokens["ops"])

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("snapship_server_received_bytes_total", repository="m") == len(body)
    # the two objects, and the two refusals' JSON error bodies
    sent = delta("snapship_server_sent_bytes_total", repository="m")
    assert 2 * len(body) < sent < 2 * len(body) + 4096, sent
    assert delta("snapship_server_requests_total", repository="m", op="put",
                 status="201") == 1
    assert delta("snapship_server_requests_total", repository="m", op="get",
                 status="200") == 2
    assert delta("snapship_server_refusals_total", role="backup", op="delete") == 2
    assert delta("snapship_server_refusals_total", role="read", op="put") == 1
    assert delta("snapship_server_unauthorized_requests_total") == 1

    gc = admin.maintenance("gc", {})
    verify = admin.maintenance("verify", {"deep": True})
    after = scrape(server, tokens["ops"])
    assert value(after, "snapship_server_maintenance_runs_total", task="gc", repository="m",
                 outcome="ok") == 1
    assert value(after, "snapship_server_gc_chunks_freed", repository="m") == \
        gc["chunks_freed"]
    assert value(after, "snapship_server_gc_bytes_freed", repository="m") == gc["bytes_freed"]
    assert value(after, "snapship_server_maintenance_last_failed", task="verify",
                 repository="m") == (0 if verify["ok"] else 1)
    assert value(after, "snapship_server_verify_versions", repository="m") == \
        verify["versions"]
    assert value(after, "snapship_server_maintenance_last_end_timestamp_seconds",
                 task="verify", repository="m") > 0

    # Only an admin token for every repository reads them.
    for name in ("db1-backup", "restorer", "only-r1", "ops-r1"):
        status, _, text = get(server, "/v1/metrics", tokens[name])
        assert status == 403 and "admin token for every repository" in text, (name, text)
        assert "snapship_server_" not in text
    assert get(server, "/v1/metrics", None)[0] == 401
    last = scrape(server, tokens["ops"])
    assert value(last, "snapship_server_refusals_total", role="admin", op="metrics") == 1
    assert value(last, "snapship_server_refusals_total", role="backup", op="metrics") == 2


def test_the_repository_labels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from snapship.server import metrics

    monkeypatch.setattr(metrics, "MAX_REPOSITORIES", 2)
    m = metrics.ServerMetrics()
    for name in ("a", "b", "c", "d", "a"):
        m.request(name, "list", 200, 0, 10)
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    sent = {dict(labels)["repository"]: v for (name, labels), v in samples.items()
            if name == "snapship_server_sent_bytes_total"}
    assert sent == {"a": 20, "b": 10, "(other)": 20}, sent
