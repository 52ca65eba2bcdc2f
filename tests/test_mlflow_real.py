"""A real MLflow tracking server notifies diffcam, set up the way docs/OPERATIONS.md says.

MLflow 3.17.2 runs from its own virtualenv (tests/mlflow_venv.py; ~1 min to build once, then
cached). The MLflow server gets the three environment variables an operator must set
(``MLFLOW_WEBHOOK_ALLOWED_SCHEMES``, ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS``,
``MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY``) and ``--artifacts-destination`` = diffcam's registry.
MLflow's own client then creates the webhook, sends MLflow's test delivery, logs the tiny
model as a run's artifacts and registers it with source ``runs:/<run>/model``; diffcam's
receiver maps it through the artifact layout and the event deployment audits it. Then the
MLflow server is restarted with the same encryption key, and a second registration still
reaches diffcam.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from diffcam.flows.ledger import AuditLedger
from diffcam.flows.paths import DEFAULT_MODEL
from diffcam.flows.registry import FolderRegistry
from diffcam.storage.store import Store
from tests.mlflow_venv import MLFLOW_VERSION, mlflow_python
from tests.test_deploy import _free_port, _wait_http, ops_loop, stop_process_group

CLIENT = r'''
import json, sys
from mlflow import MlflowClient

uri, hook, secret, model_dir = sys.argv[1:5]
c = MlflowClient(uri)
wh = c.create_webhook(name="diffcam", url=hook, secret=secret,
                      events=["model_version.created", "model_version_alias.created"])
test = c.test_webhook(wh.webhook_id)
exp = c.create_experiment("diffcam-e2e")
run = c.create_run(exp).info.run_id
c.log_artifacts(run, model_dir, "model")
c.set_terminated(run)
c.create_registered_model("shapes")
mv = c.create_model_version("shapes", source=f"runs:/{run}/model", run_id=run)
print(json.dumps({"webhook_id": wh.webhook_id, "test": {"success": test.success, "status": test.response_status,
                  "body": test.response_body, "error": test.error_message},
                  "experiment_id": exp, "run_id": run, "version": mv.version, "source": mv.source}))
'''

REGISTER_AGAIN = r'''
import sys
from mlflow import MlflowClient

uri, run = sys.argv[1:3]
print(MlflowClient(uri).create_model_version("shapes", source=f"runs:/{run}/model", run_id=run).version)
'''


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first run builds MLflow's virtualenv (~1 min); later runs ~1.5 min
def test_mlflow_registration_is_audited(tmp_path: Path) -> None:
    from diffcam.storage.synthetic_writer import write_synthetic_dataset

    python = mlflow_python()
    registry, store = tmp_path / "mlartifacts", tmp_path / "store"
    registry.mkdir()
    dataset = write_synthetic_dataset(tmp_path / "dataset", 3, 11)
    port = _free_port()
    mlflow_uri = f"http://127.0.0.1:{port}"
    mlflow_env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
                  # the receiver is plain http on loopback: MLflow refuses both by default
                  "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                  # a fixed Fernet key: a restarted server can still decrypt the webhook's secret
                  "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode()}
    mlflow_log = tmp_path / "mlflow.log"

    def start_mlflow() -> subprocess.Popen:
        return subprocess.Popen(
            [str(python.parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(registry)],
            env=mlflow_env, cwd=tmp_path, stdout=open(mlflow_log, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)

    t_start = time.time()
    mlflow = start_mlflow()
    try:
        with ops_loop(tmp_path, registry, store, dataset) as loop:
            _wait_http(f"{mlflow_uri}/health", 120, mlflow, mlflow_log)
            t_ready = time.time()
            r = subprocess.run([str(python), "-c", CLIENT, mlflow_uri, f"{loop.hook}/hooks/mlflow", loop.secret,
                                str(DEFAULT_MODEL)], env={**mlflow_env, "MLFLOW_TRACKING_URI": mlflow_uri},
                               capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stdout + r.stderr + mlflow_log.read_text()[-3000:]
            out = json.loads(r.stdout.strip().splitlines()[-1])

            # MLflow's own test delivery: a clear 2xx, and a line in the receiver's log
            assert out["test"]["success"] and out["test"]["status"] == 200, out["test"]
            assert json.loads(out["test"]["body"])["status"] == "test"
            assert out["source"] == f"runs:/{out['run_id']}/model"

            dep = loop.deployment("diffcam-audit-checkpoint", "diffcam-on-registered")
            [run] = loop.wait_runs(dep["id"], 1, 90)
            ckpt = (registry / out["experiment_id"] / out["run_id"] / "artifacts" / "model").resolve()
            assert run["parameters"]["checkpoint"] == str(ckpt)
            assert run["parameters"]["model_line"] == "shapes" and run["parameters"]["version"] == out["version"]
            done = loop.wait_terminal(run["id"], 240)
            assert done["state"]["type"] == "COMPLETED", (done["state"], loop.tail("serve"))
            t_done = time.time()

            [rec] = AuditLedger(store).records()
            note = rec.source["notification"]
            assert rec.checkpoint == str(ckpt) and rec.trigger == "event" and rec.model_line == "shapes"
            assert note["kind"] == "mlflow:model_version.created" and note["run_id"] == out["run_id"]
            row = Store(store).read_run(rec.run_id)
            assert row["status"] == "succeeded" and row["n_results"] == 3, row
            assert json.loads(row["config_json"])["audit"]["pool"]["worker_deaths"] == 0

            hook_log = loop.tail("webhook", 100_000)
            assert "MLflow test delivery (model_version.created for model 'example_model')" in hook_log, hook_log
            assert f"delivery {note['delivery_id']}: accepted shapes/{out['version']} at {ckpt}" in hook_log, hook_log

            # the nightly sweep sees the same folder (and skips it: already audited)
            found = {(c.line, c.name): c.path for c in FolderRegistry(registry).list_checkpoints()}
            assert found == {(out["experiment_id"], f"{out['run_id']}/model"): ckpt}

            # a restarted MLflow server (same MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY) still signs
            # its deliveries with the webhook's secret: version 2 of the same run reaches diffcam
            t_restart = time.time()
            stop_process_group(mlflow, timeout=15)
            mlflow = start_mlflow()
            _wait_http(f"{mlflow_uri}/health", 120, mlflow, mlflow_log)
            r = subprocess.run([str(python), "-c", REGISTER_AGAIN, mlflow_uri, out["run_id"]],
                               env={**mlflow_env, "MLFLOW_TRACKING_URI": mlflow_uri}, capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "2", r.stdout + r.stderr
            t0 = time.time()
            while f"accepted shapes/2 at {ckpt}" not in loop.tail("webhook", 100_000):
                assert time.time() - t0 < 60, loop.tail("webhook") + mlflow_log.read_text()[-3000:]
                time.sleep(0.5)
            t_restarted = time.time()
        print(f"\nMLflow {MLFLOW_VERSION}: server ready {t_ready - t_start:.0f} s after start; registration → "
              f"audit Completed {t_done - t_ready:.0f} s; restart + second delivery {t_restarted - t_restart:.0f} s")
    finally:
        stop_process_group(mlflow, timeout=15)


