"""Nothing the tool writes carries a secret (issue 42): a URI's credentials are redacted in
everything written or printed and reach only the MLflow client; the values of secret variables
in the environment are copied nowhere unless the user names them. The flow that proves it end to
end is test_track's two-cell flow (one run shared with its tracker checks): its MLflow sits behind
`basic_auth_proxy`, and `files_holding` / `printed` search what it wrote and printed."""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.client
import http.server
import io
import os
import secrets as random_secrets
import threading
import urllib.parse
from pathlib import Path

import pytest

from steps.plan.credentials import client_uri, redact, redact_tree

SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "HF_TOKEN")


@pytest.mark.parametrize(("uri", "shown"), [
    ("http://alice:s3cret@127.0.0.1:5000/", "http://alice:***@127.0.0.1:5000/"),
    ("https://alice:s3cret@mlflow.example.com/path?x=1", "https://alice:***@mlflow.example.com/path?x=1"),
    ("https://:s3cret@mlflow.example.com", "https://:***@mlflow.example.com"),
    ("https://ghp_TOKEN123@mlflow.example.com:443", "https://***@mlflow.example.com:443"),
    ("http://alice@127.0.0.1:5000/", "http://***@127.0.0.1:5000/"),  # a user alone reads as a token: hidden
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:///tmp/mlflow.db", "sqlite:///tmp/mlflow.db"),
    ("file:///home/me/mlruns", "file:///home/me/mlruns"),
    ("http://alice:***@127.0.0.1:5000/", "http://alice:***@127.0.0.1:5000/"),  # already redacted: unchanged
])
def test_redact_hides_the_password_or_token_of_a_uri_and_keeps_the_rest(uri, shown):
    assert redact(uri) == shown


def test_redact_finds_uris_inside_text_and_leaves_addresses_without_a_scheme():
    line = ("🏃 View run abc at: http://bob:pa55@10.0.0.1:5000/#/experiments/1/runs/2 "
            "(also https://t0ken@host.example/x); git@github.com:me/repo.git")
    assert redact(line) == ("🏃 View run abc at: http://bob:***@10.0.0.1:5000/#/experiments/1/runs/2 "
                            "(also https://***@host.example/x); git@github.com:me/repo.git")


def test_redact_tree_redacts_every_string_of_nested_data():
    tree = {"track": {"mlflow": {"tracking_uri": "http://u:p@h:1/"}}, "list": ["https://tok@h", 3, None]}
    assert redact_tree(tree) == {"track": {"mlflow": {"tracking_uri": "http://u:***@h:1/"}},
                                 "list": ["https://***@h", 3, None]}


def test_client_uri_moves_a_uri_s_credentials_into_mlflow_s_own_variables(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert client_uri("http://alice:s3cret@127.0.0.1:5000/") == "http://127.0.0.1:5000/"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "s3cret")
    # a redacted URI: its credentials are already in the environment
    assert client_uri("http://alice:***@127.0.0.1:5000/") == "http://127.0.0.1:5000/"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    assert client_uri("sqlite:///tmp/m.db") == "sqlite:///tmp/m.db"


def test_a_matrix_keeps_the_redacted_uri_and_its_credentials_only_in_the_environment(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    from steps.plan.matrix import parse_matrix_text

    parsed = parse_matrix_text("name: m\nmodels: llama-debug\npeft: lora\nstrategy: single\nlr: [0.01]\n"
                               "track: {mlflow: {tracking_uri: 'http://alice:pw-1234@127.0.0.1:5000/', "
                               "experiment: e}}\n")
    assert parsed["track"]["mlflow"]["tracking_uri"] == "http://alice:***@127.0.0.1:5000/"
    assert "pw-1234" not in repr(parsed)
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "pw-1234")


def test_a_matrix_problem_never_shows_a_password():
    from steps.plan.matrix import parse_matrix
    from steps.plan.schema import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_matrix({"name": "m", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": 0.01,
                      "description": ["http://alice:pw-5678@h:1/"],
                      "report": {"project_to": ["http://bob:pw-9999@h:2/"]}})
    assert err.value.problems == ["description: ['http://alice:***@h:1/'] is invalid: input should be a valid string",
                                  "report.project_to: ['http://bob:***@h:2/'] is invalid: input should be a valid "
                                  "string"]
    assert "pw-5678" not in str(err.value) and "pw-9999" not in str(err.value)


def test_a_uri_with_a_token_alone_is_refused_rather_than_sent_without_it():
    from steps.plan.matrix import parse_matrix
    from steps.plan.schema import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_matrix({"name": "m", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": 0.01,
                      "track": {"mlflow": {"tracking_uri": "https://tok-4321@h/", "experiment": "e"}}})
    (problem,) = err.value.problems
    assert problem.startswith("track.mlflow.tracking_uri: 'https://***@h/' is invalid: credentials in a tracking "
                              "URI need a user and a password")


def test_start_s_refusal_for_an_unreachable_server_shows_the_redacted_uri(monkeypatch):
    from steps.flow import tracking
    from steps.flow.launcher import free_port
    from steps.plan.matrix import parse_matrix

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    uri = f"http://alice:pw-unreachable-42@127.0.0.1:{free_port()}/"  # nothing listens there
    spec = parse_matrix({"name": "m", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": 0.01,
                         "track": {"mlflow": {"tracking_uri": uri, "experiment": "e"}}})
    with pytest.raises(tracking.TrackerUnreachable) as err:
        tracking.start(spec, "1", "FinetuneMatrixFlow")
    assert "pw-unreachable-42" not in str(err.value)
    assert f"'{redact(uri)}'" in str(err.value)


def test_start_refuses_a_redacted_uri_whose_password_it_was_not_given(monkeypatch):
    from steps.flow import tracking
    from steps.plan.matrix import parse_matrix

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    spec = parse_matrix({"name": "m", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": 0.01,
                         "track": {"mlflow": {"tracking_uri": "http://alice:***@127.0.0.1:5000/", "experiment": "e"}}})
    with pytest.raises(tracking.TrackerUnreachable) as err:
        tracking.start(spec, "1", "FinetuneMatrixFlow")
    assert str(err.value) == (
        "the matrix's trackers cannot be used:\n  track.mlflow.tracking_uri: 'http://alice:***@127.0.0.1:5000/' "
        "carried a password, which is kept out of everything written, and this process was not given it: set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD where it runs (docs/remote.md#secrets)")


def test_remote_cells_get_no_environment_value_unless_the_matrix_names_it(monkeypatch):
    from steps.flow.compute import train_decorators
    from steps.flow.sagemaker.job import plan_job
    from steps.flow.tasks import MatrixRefused, plan
    from steps.plan.matrix import expand, parse_matrix

    values = {name: f"value-of-{name}-{random_secrets.token_hex(8)}" for name in SECRET_VARIABLES}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    base = {"name": "m", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": 0.01,
            "instance": "g5.xlarge"}
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/finetune-matrix:0.1.0"
    for compute, remote in (("batch", {"image": image, "queue": "q"}), ("kubernetes", {"image": image})):
        matrix = parse_matrix({**base, "compute": compute, "remote": remote}).model_dump(mode="json")
        assert "value-of-" not in repr(train_decorators(matrix))

    def job(remote):
        spec = parse_matrix({**base, "compute": "sagemaker", "remote": remote})
        return spec, plan_job(expand(spec)[0].cell, spec.remote.model_dump(mode="json"), "7", 0, "s3://bucket/prefix")

    plain_job = job({})[1]
    assert "value-of-" not in repr(plain_job)
    spec, named = job({"env": ["WANDB_API_KEY"]})
    assert named.environment == {**plain_job.environment, "WANDB_API_KEY": values["WANDB_API_KEY"]}
    assert "value-of-AWS" not in repr(named) and "value-of-HF" not in repr(named)
    assert spec.model_dump(mode="json")["remote"]["env"] == ["WANDB_API_KEY"]  # the matrix keeps the name only
    monkeypatch.delenv("WANDB_API_KEY")
    with pytest.raises(MatrixRefused) as err:
        plan(spec.model_dump(mode="json"))
    assert str(err.value).endswith(
        "remote.env: WANDB_API_KEY not set on this machine; each cell's job gets the variables remote.env names "
        "from the environment the flow starts in")


def test_remote_env_is_a_list_of_variable_names_for_sagemaker_only():
    from steps.plan.matrix import parse_matrix
    from steps.plan.schema import ConfigError

    base = {"name": "m", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": 0.01}
    with pytest.raises(ConfigError) as err:
        parse_matrix({**base, "instance": "g5.xlarge", "compute": "sagemaker", "remote": {"env": ["HF_TOKEN=x"]}})
    assert err.value.problems == ["remote.env: ['HF_TOKEN=x'] is invalid: not variable names: 'HF_TOKEN=x' "
                                  "(letters, digits and _, not starting with a digit)"]
    with pytest.raises(ConfigError) as err:
        parse_matrix({**base, "remote": {"env": ["HF_TOKEN"]}})
    assert err.value.problems == ["remote.env: only used by compute 'sagemaker', not 'local'"]


# --- a real flow -------------------------------------------------------------------------------

@contextlib.contextmanager
def basic_auth_proxy(upstream: str, user: str, password: str):
    """A loopback front to a tracking server that refuses (401) every request without this user
    and password, as an MLflow deployment behind basic auth does (plain `mlflow server` ignores
    credentials, so it alone would not show that they arrive). Yields its URI and the paths of
    the requests it refused."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    target = urllib.parse.urlsplit(upstream)
    refused: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def forward(self):
            if self.headers.get("Authorization") != expected:
                refused.append(f"{self.command} {self.path}")
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = self.rfile.read(int(self.headers["Content-Length"])) if self.headers.get("Content-Length") else None
            skip = {"host", "authorization", "connection", "content-length", "transfer-encoding"}
            headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in skip:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            connection.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", refused
    finally:
        server.shutdown()
        server.server_close()


def _hidden_forms(secret: str) -> list[bytes]:
    """The secret as bytes and as it reads inside base64 at each alignment (cards embed their
    data as base64 JSON): the middle of its encoding, which does not depend on what is around it."""
    raw = secret.encode()
    forms = [raw]
    for k in range(3):
        encoded = base64.b64encode(b"\0" * k + raw)
        forms.append(encoded[4 if k else 0 : -4])
    return forms


def _readable(path: Path) -> list[bytes]:
    """A file's bytes, and what they hold where they are compressed (gzip: Metaflow's artifacts,
    logs and code package; Parquet: the results table)."""
    data = path.read_bytes()
    out = [data]
    if data[:2] == b"\x1f\x8b":
        try:
            out.append(gzip.decompress(data))
        except (OSError, EOFError):
            pass
    if path.suffix == ".parquet":
        import pandas as pd

        out.append(pd.read_parquet(io.BytesIO(data)).to_csv().encode())
    return out


def files_holding(paths: list[Path], secrets: dict[str, str]) -> list[str]:
    """'NAME in PATH' for each secret found in the files given, or under the folders given."""
    found = []
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    for path in (f for f in files if f.is_file() and not f.is_symlink()):
        blobs = _readable(path)
        for name, secret in secrets.items():
            if any(form in blob for form in _hidden_forms(secret) for blob in blobs):
                found.append(f"{name} in {path}")
    return found


def printed(output: str, secrets: dict[str, str]) -> list[str]:
    """The names of the secrets that `output` (a terminal's text) shows, plainly or in base64."""
    return [name for name, secret in secrets.items() if any(f.decode() in output for f in _hidden_forms(secret))]
