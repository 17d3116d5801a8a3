"""Try stageline on a Ray cluster of two nodes, on this machine.

    python cluster/try_multinode.py          (from the repository root, after `stageline demo`)

Starts a Ray head and a worker node (two raylets, `ray start`, token auth on), a
redis-server as the online store (if installed; else the in-memory store), deploys
cluster/serve.yaml with `serve deploy`, scores a record over HTTP, runs the batch
pipeline through the Jobs API (`ray job submit`), then kills the worker node and
scores again. Ctrl-C (or SIGTERM) stops everything it started, and only that.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stageline.context import resolve_home  # noqa: E402
from tests.support.cluster import LocalCluster  # noqa: E402
from tests.support.processes import free_port  # noqa: E402

RECORD = {
    "transaction_id": "t1",
    "customer_id": "c000001",
    "amount": 420.5,
    "merchant_category": "jewelry",
    "ts": "2026-02-20T02:15:00Z",
    "country": "FR",
}


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*argv: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
    home = resolve_home(None)
    if not (home / "models").exists():
        raise SystemExit(f"no demo under {home}: run `stageline demo` first")
    workdir = Path(tempfile.mkdtemp(prefix="stageline-multinode-"))
    redis = None
    online = "memory"
    cluster = LocalCluster(workdir / "ray", env={"STAGELINE_HOME": str(home)})
    try:
        if shutil.which("redis-server"):
            port = free_port()
            redis = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
                stdout=subprocess.DEVNULL,
            )
            online = f"redis://127.0.0.1:{port}/0"
            time.sleep(0.5)
            step(f"Redis online store at {online}")
            print(run("stageline", "materialize", "--online", online))

        step("Ray head and one worker node (token authentication on)")
        cluster.start_head(num_cpus=3)
        cluster.add_worker(num_cpus=3)
        time.sleep(15)
        print(run("ray", "status", "--address", cluster.address, env=cluster.env))

        step("serve deploy cluster/serve.yaml")
        config = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
        http = free_port()
        config["http_options"]["port"] = http
        args = config["applications"][0]["args"]
        args.update(spec=str(ROOT / args["spec"]), home=str(home), online=online)
        (workdir / "serve.yaml").write_text(yaml.safe_dump(config))
        run("serve", "deploy", str(workdir / "serve.yaml"), "--address", cluster.dashboard_url,
            env=cluster.env)  # fmt: skip
        url = f"http://127.0.0.1:{http}"
        for _ in range(240):
            try:
                if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        answer = requests.post(f"{url}/predict", json={"records": [RECORD]}, timeout=30)
        print(answer.status_code, json.dumps(answer.json()))

        step("the batch pipeline as a Ray job (Jobs API)")
        print(run(
            "ray", "job", "submit", "--address", cluster.dashboard_url, "--",
            sys.executable, "-m", "batch_app", "--spec", str(ROOT / "pipelines/fraud.yaml"),
            "--home", str(home), "--online", online,
            "--input", str(home / "demo" / "batch"), "--output", str(workdir / "scores"),
            env=cluster.env,
        )[-600:])  # fmt: skip

        step("kill the worker node; the app keeps answering")
        cluster.kill(cluster.nodes[-1])
        started = time.monotonic()
        while True:
            try:
                answer = requests.post(f"{url}/predict", json={"records": [RECORD]}, timeout=30)
                if answer.status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        print(f"{answer.status_code} after {time.monotonic() - started:.1f} s: {answer.json()}")
        print(f"\nServe at {url}, dashboard at {cluster.dashboard_url}. Ctrl-C to stop.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        step("stopping")
        cluster.stop()
        if redis is not None:
            redis.terminate()
            redis.wait()


if __name__ == "__main__":
    main()
