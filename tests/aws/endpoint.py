"""A local AWS endpoint for offline tests: moto in server mode plus a SageMaker training emulator.

One HTTP endpoint on 127.0.0.1:<free port> serves every service moto serves (S3, STS, IAM,
CloudWatch Logs, ...); SageMaker's CreateTrainingJob, DescribeTrainingJob, StopTrainingJob and
ListTrainingJobs are answered by `TrainingService` (tests/aws/training.py), which runs the jobs
on this machine; every other SageMaker request goes to moto. The real boto3 and the real
sagemaker SDK talk HTTP to it: point them at it with `client_env()` or `client(service)`.

    with LocalAWS(tmp_path) as aws:
        aws.client("s3").create_bucket(Bucket="b")
        subprocess.run(cmd, env={**os.environ, **aws.client_env()})
"""

from __future__ import annotations

import io
import json
import sys
import threading
import urllib.parse
import urllib.request
import uuid
from html import escape
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from moto.core import DEFAULT_ACCOUNT_ID
from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

from tests.aws import hosts as hosts_module
from tests.aws.training import ServiceError, TrainingService

JSON_11 = "application/x-amz-json-1.1"

# SageMaker Python SDK defaults for code run against this endpoint. TelemetryOptOut: no
# telemetry requests to amazonaws.com. Session.DefaultS3Bucket: the SDK's own default bucket
# name; without it Session.default_bucket() asks STS for the account through an endpoint URL it
# hard-codes (https://sts.<region>.amazonaws.com), which AWS_ENDPOINT_URL cannot redirect.
SAGEMAKER_CONFIG = """\
SchemaVersion: '1.0'
SageMaker:
  PythonSDK:
    Modules:
      TelemetryOptOut: true
      Session:
        DefaultS3Bucket: {bucket}
"""

IAM_XMLNS = "https://iam.amazonaws.com/doc/2010-05-08/"
SAGEMAKER_TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}


class _QuietHandler(MotoRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:  # no access log per request
        pass


def _read_body(environ: dict[str, Any]) -> bytes:
    """The request body, put back for whoever reads it next."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    return body


def _signing_service(environ: dict[str, Any]) -> str:
    """The service of a SigV4 request (`Credential=KEY/DATE/REGION/SERVICE/aws4_request`)."""
    scope = environ.get("HTTP_AUTHORIZATION", "").split("Credential=", 1)[-1].split(",", 1)[0]
    parts = scope.split("/")
    return parts[3] if len(parts) == 5 else ""


class SageMakerTrainingMiddleware:
    """WSGI: SageMaker JSON requests for the training API go to the emulator, the rest to moto.

    One IAM action moto lacks is answered here too: SimulatePrincipalPolicy (the sagemaker SDK
    checks an execution role with it before CreateTrainingJob): every action is allowed for a
    role that exists, as moto enforces no policies; NoSuchEntity otherwise.
    """

    def __init__(self, app: Any, training: TrainingService, role_exists: Any = None):
        self.app, self.training, self.role_exists = app, training, role_exists

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if not target.startswith("SageMaker."):
            if self.role_exists is not None and _signing_service(environ) == "iam":
                form = urllib.parse.parse_qs(_read_body(environ).decode("utf-8", "replace"))
                if form.get("Action") == ["SimulatePrincipalPolicy"]:
                    return self._simulate_principal_policy(form, start_response)
            return self.app(environ, start_response)
        body = _read_body(environ)
        operation = target.split(".", 1)[1]
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            params = {}
        self.training.requests.append((operation, params))
        if operation not in TrainingService.OPERATIONS:
            return self.app(environ, start_response)
        headers = [("Content-Type", JSON_11), ("x-amzn-RequestId", str(uuid.uuid4()))]
        try:
            payload, status = self.training.handle(operation, params), "200 OK"
        except ServiceError as error:
            payload = {"__type": error.code, "message": error.message}
            status = f"{error.status} {'Bad Request' if error.status == 400 else 'Error'}"
            headers.append(("x-amzn-ErrorType", error.code))
        except Exception as error:  # the emulator's bug, reported the way AWS reports its own
            payload = {"__type": "InternalFailure", "message": repr(error)}
            status = "500 Internal Server Error"
            headers.append(("x-amzn-ErrorType", "InternalFailure"))
        data = json.dumps(payload).encode()
        headers.append(("Content-Length", str(len(data))))
        start_response(status, headers)
        return [data]

    def _simulate_principal_policy(self, form: dict[str, list[str]], start_response: Any) -> Any:
        arn = form.get("PolicySourceArn", [""])[0]
        request_id = str(uuid.uuid4())
        if ":role/" in arn and not self.role_exists(arn):
            status = "404 Not Found"
            xml = (
                f'<ErrorResponse xmlns="{IAM_XMLNS}"><Error><Type>Sender</Type><Code>NoSuchEntity</Code>'
                f"<Message>The role with name {escape(arn.rsplit('/', 1)[-1])} cannot be found.</Message></Error>"
                f"<RequestId>{request_id}</RequestId></ErrorResponse>"
            )
        else:
            numbered = [
                (int(k.rsplit(".", 1)[1]), v[0]) for k, v in form.items() if k.startswith("ActionNames.member.")
            ]
            actions = [action for _, action in sorted(numbered)]
            members = "".join(
                f"<member><EvalActionName>{escape(action)}</EvalActionName><EvalResourceName>*</EvalResourceName>"
                "<EvalDecision>allowed</EvalDecision><MatchedStatements/><MissingContextValues/></member>"
                for action in actions
            )
            status = "200 OK"
            xml = (
                f'<SimulatePrincipalPolicyResponse xmlns="{IAM_XMLNS}"><SimulatePrincipalPolicyResult>'
                f"<IsTruncated>false</IsTruncated><EvaluationResults>{members}</EvaluationResults>"
                "</SimulatePrincipalPolicyResult>"
                f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata>"
                "</SimulatePrincipalPolicyResponse>"
            )
        data = xml.encode()
        start_response(status, [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))])
        return [data]


class LocalAWS:
    """moto (S3, STS, IAM, logs, ...) + SageMaker training emulator on 127.0.0.1:<free port>.

    `workdir` holds the emulated instances' `/opt/ml` directories; `python` (a virtual
    environment's interpreter) is what training containers find first on PATH.
    """

    ACCESS_KEY = "testing"
    SECRET_KEY = "testing"

    def __init__(self, workdir: Path, python: str = sys.executable, region: str = "us-east-1"):
        self.workdir = Path(workdir)
        self.python = python
        self.region = region
        self.account_id = DEFAULT_ACCOUNT_ID
        self.url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._hosts = hosts_module.HostsFile()
        self._session: boto3.session.Session | None = None
        self._session_lock = threading.Lock()
        self.training = TrainingService(
            self.workdir / "jobs",
            python=python,
            region=region,
            account_id=self.account_id,
            client=self.client,
            client_env=self.client_env,
            hosts=self._hosts,
        )

    multi_host_supported = staticmethod(hosts_module.multi_host_supported)

    def start(self) -> LocalAWS:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "sagemaker-config.yaml").write_text(SAGEMAKER_CONFIG.format(bucket=self.default_bucket))
        app = SageMakerTrainingMiddleware(
            DomainDispatcherApplication(create_backend_app), self.training, role_exists=self._role_exists
        )
        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-aws", daemon=True)
        self._thread.start()
        # moto's state lives in this process and outlives servers: start from nothing.
        request = urllib.request.Request(f"{self.url}/moto-api/reset", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
        return self

    def stop(self) -> None:
        try:
            self.training.shutdown()
        finally:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None
            if self._thread is not None:
                self._thread.join(10)
                self._thread = None
            self._hosts.restore()

    def __enter__(self) -> LocalAWS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def default_bucket(self) -> str:
        """The sagemaker SDK's default bucket name (set in its config: see SAGEMAKER_CONFIG)."""
        return f"sagemaker-{self.region}-{self.account_id}"

    def create_role(self, name: str = "SageMakerExecutionRole") -> str:
        """An IAM role SageMaker may assume (the SDK checks the trust policy); its ARN."""
        iam = self.client("iam")
        try:
            return iam.get_role(RoleName=name)["Role"]["Arn"]
        except iam.exceptions.NoSuchEntityException:
            return iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(SAGEMAKER_TRUST))["Role"]["Arn"]

    def _role_exists(self, arn: str) -> bool:
        iam = self.client("iam")
        try:
            iam.get_role(RoleName=arn.rsplit("/", 1)[-1])
        except iam.exceptions.NoSuchEntityException:
            return False
        return True

    def client_env(self) -> dict[str, str]:
        """Environment for a process that must talk to this endpoint and never to the real AWS."""
        config = str(self.workdir / "sagemaker-config.yaml")
        return {
            # Every botocore client (boto3, the sagemaker SDK, Metaflow's S3 client) goes here.
            "AWS_ENDPOINT_URL": self.url,
            # ...and a configured `ignore_configured_endpoint_urls` may not turn that off.
            "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "false",
            # Dummy credentials: found first in the chain, so no profile, SSO or role is tried.
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            # The region, under both names (the CLI/SDKs read the first, some tools the second).
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            # No probing of the EC2 instance metadata service for credentials or the region.
            "AWS_EC2_METADATA_DISABLED": "true",
            # Metaflow's S3 datastore client takes its endpoint from here, not from AWS_ENDPOINT_URL.
            "METAFLOW_S3_ENDPOINT_URL": self.url,
            # sagemaker SDK defaults (TelemetryOptOut): no telemetry requests to amazonaws.com.
            "SAGEMAKER_ADMIN_CONFIG_OVERRIDE": config,
            "SAGEMAKER_USER_CONFIG_OVERRIDE": config,
        }

    def client(self, service: str) -> Any:
        """A boto3 client of `service` bound to this endpoint (safe to call from any thread)."""
        # One session for all clients (service models are loaded once); sessions are not
        # thread-safe, the clients they make are.
        with self._session_lock:
            if self._session is None:
                self._session = boto3.session.Session(
                    aws_access_key_id=self.ACCESS_KEY,
                    aws_secret_access_key=self.SECRET_KEY,
                    region_name=self.region,
                )
            return self._session.client(
                service,
                endpoint_url=self.url,
                config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=10, read_timeout=60),
            )
