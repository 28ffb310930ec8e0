"""The fleet's policy and plumbing without Ray: FleetState on synthetic reports, a FleetEngine over the real
engine, the merged /metrics, the options and the CLI's one-line error when ray is missing."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util

import pytest
from sparsedial.engine.api import PolicySpec

from sparsedial.deploy.fleet import FleetState, Report, spec_from_dict, spec_to_dict
from sparsedial.deploy.options import FleetOptions, parse_ladder
from sparsedial.deploy.replica import merge_metrics

LADDER = ((6.0, "50%"), (10.0, "70%"))


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def rep(name: str, running: int, waiting: int = 0, version: int = 1) -> Report:
    return Report(replica=name, pid=1, running=running, waiting=waiting, kv_used=running, kv_total=4,
                  version=version, tier="dense")


def test_fleet_policy_sums_the_replicas_load_with_hysteresis():
    clock = Clock()
    st = FleetState(stale_s=2.0, clock=clock)
    spec = PolicySpec(mode="load", default_tier="dense", ladder=LADDER, hysteresis=2.0)
    assert st.report(rep("a", 0, version=0), spec, 0)["version"] == 1  # the first replica's proposal
    assert st.report(rep("b", 4, 1), spec, 0)["tier"] == "dense"  # 0 + 5 < 6
    assert st.report(rep("a", 2), None, 1)["tier"] == "50%"  # 2 + 5 = 7 >= 6: one replica alone is below
    assert st.report(rep("a", 4, 2), None, 1)["tier"] == "70%"  # 6 + 5 = 11 >= 10
    assert st.report(rep("a", 3), None, 1)["tier"] == "70%"  # 8: within the hysteresis of 10
    assert st.report(rep("a", 2), None, 1)["tier"] == "50%"  # 7 < 10 - 2
    assert st.report(rep("b", 0), None, 1)["tier"] == "dense"  # 2 < 6 - 2
    st.report(rep("b", 9), None, 1)
    assert st.tier() == "70%"
    clock.t += 3  # b stops reporting (killed): its load no longer counts once stale
    assert st.report(rep("a", 0), None, 1)["tier"] == "dense" and st.reply()["replicas"] == 1


def test_policy_versions_and_a_restarted_controller():
    st = FleetState()
    spec = PolicySpec(mode="fixed", default_tier="dense")
    st.report(rep("a", 0, version=0), spec, 0)
    v = st.set_policy(PolicySpec(mode="fixed", default_tier="40%"))
    assert v == 2 and st.tier() == "40%" and st.applied(2) == (0, 1)
    assert st.report(rep("a", 0, version=2), spec, 1)["policy"]["default_tier"] == "40%"  # stale proposal ignored
    assert st.applied(2) == (1, 1)
    fresh = FleetState()  # the controller restarted: the replicas' newer policy wins over nothing
    reply = fresh.report(rep("a", 0, version=2), spec_from_dict(st.reply()["policy"]), 2)
    assert reply["version"] == 2 and reply["tier"] == "40%"
    with pytest.raises(ValueError):
        st.set_policy(PolicySpec(mode="load", default_tier="dense", ladder=()))
    assert spec_from_dict(spec_to_dict(st.spec)) == st.spec


def test_fleet_engine_follows_the_fleet_tier(tmp_path):
    from sparsedial.engine import AsyncEngine, EngineConfig
    from sparsedial.engine.sampling import SamplingParams

    from sparsedial.deploy.replica import FleetEngine
    from sparsedial.paths import embedded_models_dir

    engine = AsyncEngine(EngineConfig(model=embedded_models_dir() / "stdlib-tiny-elastic", device="cpu",
                                      max_batch=2))
    try:
        fe = FleetEngine(engine, PolicySpec(mode="load", default_tier="dense", ladder=((6, "0.5"),)), "r1")
        assert fe.get_policy().ladder == ((6.0, "50%"),)  # canonical names
        fe.apply({"version": 3, "policy": spec_to_dict(fe.get_policy()), "tier": "70%", "load": 12.0,
                  "replicas": 2})
        assert fe.version == 3 and fe.stats().current_auto_tier == "70%"
        assert engine.get_policy() == PolicySpec(mode="fixed", default_tier="70%")  # the engine: fixed, fleet tier

        async def run():
            return [e async for e in fe.submit("def f():", SamplingParams(max_tokens=3))][-1].tier

        assert asyncio.run(run()) == "70%"  # an auto request is served (and reported) at the fleet tier
        assert fe.report()["tier"] == "70%" and fe.report()["version"] == 3
    finally:
        engine.shutdown()


def test_merged_metrics_label_each_replica_once_per_family():
    a = ('# HELP sparsedial_requests_total Finished.\n# TYPE sparsedial_requests_total counter\n'
         'sparsedial_requests_total{model_name="m",tier="dense"} 3.0\n# HELP g G.\n# TYPE g gauge\ng 1.0\n')
    b = a.replace("3.0", "4.0").replace("g 1.0", "g 2.0")
    text = merge_metrics({"r1": a, "r2": b}, {"replicas": 2, "load": 3.0, "version": 4, "tier": "50%"})
    assert text.count("# TYPE sparsedial_requests_total counter") == 1
    assert 'sparsedial_requests_total{replica="r1",model_name="m",tier="dense"} 3.0' in text
    assert 'sparsedial_requests_total{replica="r2",model_name="m",tier="dense"} 4.0' in text
    assert 'g{replica="r2"} 2.0' in text and 'sparsedial_fleet_auto_tier{tier="50%"} 1.0' in text
    from prometheus_client.parser import text_string_to_metric_families

    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))  # a valid exposition: each family once


def test_options():
    assert parse_ladder("8=50%, 16=2:4") == ((8.0, "50%"), (16.0, "2:4"))
    with pytest.raises(ValueError):
        parse_ladder("8:50%")
    o = FleetOptions.from_dict({"autoscale": True, "min_replicas": 1, "max_replicas": 3, "ladder": "4=70%",
                                "target_ongoing_requests": 6})
    d = o.deployment_options()
    assert d["autoscaling_config"]["max_replicas"] == 3 and d["autoscaling_config"]["target_ongoing_requests"] == 6
    assert "num_replicas" not in d and FleetOptions.from_dict(o.to_dict()) == o
    assert FleetOptions(replicas=3).deployment_options()["num_replicas"] == 3
    with pytest.raises(ValueError, match="unknown fleet option"):
        FleetOptions.from_dict({"replica": 2})


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed here")
def test_cli_without_ray_says_how_to_install(capsys):
    from sparsedial.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--replicas", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "sparsedial: error: scale-out needs Ray Serve, which is not installed: pip install 'sparsedial[ray]'"


def test_the_kuberay_manifest_builds_fleet_options():
    """docker/kuberay-rayservice.yaml's Serve config names app_builder and valid FleetOptions."""
    from pathlib import Path

    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker" / "kuberay-rayservice.yaml").read_text())
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "sparsedial.deploy:app_builder"
    from sparsedial import deploy

    assert callable(deploy.app_builder)
    opts = FleetOptions.from_dict(app["args"])
    assert opts.autoscale and opts.ladder == ((12.0, "50%"), (24.0, "70%"))
    assert opts.deployment_options()["autoscaling_config"]["max_replicas"] == 4
    # every pod's proxy answers a dead replica's requests in the JSON error shape (proxy_errors.py)
    from sparsedial.deploy.proxy_errors import CALLBACK, ENV_VAR, middlewares

    cluster = doc["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert {"name": ENV_VAR, "value": CALLBACK} in container["env"], container["name"]
    module, _, name = CALLBACK.partition(":")
    assert getattr(importlib.import_module(module), name) is middlewares


# ------------------------------------------------------------------ the proxy's JSON errors (proxy_errors.py)
# Stand-ins for Serve's proxy app on the failure paths read in ray/serve/_private/proxy.py: a replica that
# died before answering ends the request without any ASGI message; mid-stream, without the final body; Serve's
# own errors are plain-text responses.
def _lifespan(app):  # LiveServer runs uvicorn with lifespan "on"
    async def with_lifespan(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    return with_lifespan


async def _dies_before_answering(scope, receive, send):
    pass


async def _dies_mid_stream(scope, receive, send):
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
    await send({"type": "http.response.body", "body": b'data: {"type": "token"}\n\n', "more_body": True})


async def _serve_plain_503(scope, receive, send):
    await send({"type": "http.response.start", "status": 503,
                "headers": [[b"content-type", b"text/plain; charset=utf-8"], [b"retry-after", b"2"]]})
    await send({"type": "http.response.body", "body": b"Deployment 'EngineReplica' is unavailable."})


async def _answers(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok": true}', "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _call(app, path: str = "/generate") -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send))
    return sent


def _error(body: bytes) -> dict:
    import json

    from sparsedial.server.protocol import ErrorResponse

    doc = json.loads(body)
    ErrorResponse.model_validate(doc)  # the server's error schema (OpenAI's shape)
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    return doc["error"]


def test_proxy_middleware_answers_a_dead_replica_in_the_json_error_shape():
    from sparsedial.deploy.proxy_errors import ReplicaErrorMiddleware, middlewares, replica_gone_error

    start, body = _call(ReplicaErrorMiddleware(_dies_before_answering))
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert (b"content-type", b"application/json") in start["headers"]
    err = _error(body["body"])
    assert err == replica_gone_error().body()["error"]
    assert err["code"] == "replica_unavailable" and err["type"] == "service_unavailable"
    assert "replica" in err["message"] and "retry" in err["message"]

    # mid-stream: what the replica sent, then an error event and [DONE], and the response ends
    *head, last = _call(ReplicaErrorMiddleware(_dies_mid_stream))
    assert [m["type"] for m in head] == ["http.response.start", "http.response.body"]
    assert last["type"] == "http.response.body" and not last.get("more_body", False)
    error_event, done = last["body"].split(b"\n\n")[:2]
    assert error_event.startswith(b"data: ") and done == b"data: [DONE]"
    assert _error(error_event[6:])["code"] == "replica_unavailable"

    # Serve's own plain-text errors: same status and headers, the text in the JSON body
    start, body = _call(ReplicaErrorMiddleware(_serve_plain_503))
    assert start["status"] == 503 and (b"retry-after", b"2") in start["headers"]
    err = _error(body["body"])
    assert err["code"] == "not_ready" and "EngineReplica' is unavailable" in err["message"]

    # the replicas' own responses and Serve's health routes go through untouched
    assert _call(ReplicaErrorMiddleware(_answers)) == _call(_answers)
    assert _call(ReplicaErrorMiddleware(_dies_before_answering), "/-/healthz") == []
    (mw,) = middlewares()
    assert mw.cls is ReplicaErrorMiddleware


def test_proxy_middleware_under_uvicorn():
    """What clients saw before (uvicorn's plain-text 500, a stream cut without an end) and see now."""
    import httpx
    from sparsedial.server.live import LiveServer

    from sparsedial.deploy.proxy_errors import ReplicaErrorMiddleware

    with LiveServer(_lifespan(_dies_before_answering)) as s:
        r = httpx.post(s.url + "/v1/completions", json={})
        assert (r.status_code, r.text) == (500, "Internal Server Error")
    with LiveServer(ReplicaErrorMiddleware(_lifespan(_dies_before_answering))) as s:
        r = httpx.post(s.url + "/v1/completions", json={})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert _error(r.content)["code"] == "replica_unavailable"
    with LiveServer(ReplicaErrorMiddleware(_lifespan(_dies_mid_stream))) as s, \
            httpx.stream("POST", s.url + "/generate", json={}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[0] == 'data: {"type": "token"}' and lines[-1] == "data: [DONE]"
    assert _error(lines[-2][6:].encode())["code"] == "replica_unavailable"


def test_the_openai_client_reads_the_proxy_errors():
    """openai-python (its own parser, no retries) on the middleware's answers: a 503 with the error's code, and
    a stream whose replica died raises with the error's message."""
    openai = pytest.importorskip("openai")
    from sparsedial.server.live import LiveServer

    from sparsedial.deploy.proxy_errors import REPLICA_GONE, ReplicaErrorMiddleware

    with LiveServer(ReplicaErrorMiddleware(_lifespan(_dies_before_answering))) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="m", prompt="x", max_tokens=4)
    assert e.value.status_code == 503 and e.value.code == "replica_unavailable"
    assert e.value.message == f"Error code: 503 - {REPLICA_GONE}"  # openai-python prefixes the status
    with LiveServer(ReplicaErrorMiddleware(_lifespan(_dies_mid_stream))) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        chunks = []
        with pytest.raises(openai.APIError) as e:
            for chunk in c.completions.create(model="m", prompt="x", max_tokens=4, stream=True):
                chunks.append(chunk)  # noqa: PERF402 - the chunks before the error
    assert len(chunks) == 1 and e.value.message == REPLICA_GONE and e.value.code == "replica_unavailable"
