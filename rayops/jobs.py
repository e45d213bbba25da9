"""Submit a spec as a Ray job (`ray job submit` under the hood) and follow it through a handle.

`submit_spec` writes the spec into a small working directory that Ray uploads with the job, and runs
`python -m <module> <command> spec.yaml` on the cluster. With no address (argument, then $RAY_ADDRESS),
a local head is started in its own process and owned by the handle (`close()` stops it).

Clusters with Ray token authentication (`RAY_AUTH_MODE=token`, as both configs in `cluster/` run) refuse
the Jobs API without the cluster's token. The token is found as Ray itself looks for it ($RAY_AUTH_TOKEN,
then the file $RAY_AUTH_TOKEN_PATH, then `~/.ray/auth_token` when $RAY_AUTH_MODE is `token`) and sent as
an `Authorization: Bearer` header on every request; it is never logged, never put in an error message and
never forwarded to the job (the cluster's nodes hold their own copy).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import BaseModel
from ray.job_submission import JobStatus, JobSubmissionClient

from rayops import artifacts, settings, storage
from rayops.local_head import start_head, stop_process_group, wait_for_dashboard
from schemas.errors import LcscCheckfreeError
from schemas.loader import dump_spec, parse_spec

log = logging.getLogger(__name__)
ResultT = TypeVar("ResultT", bound=BaseModel)
RESULT_FILE = "result.json"
# Storage settings forwarded to other processes (a job on a remote cluster, stage actors): endpoints, region and
# knobs, never credentials; the nodes use their own (instance role, IRSA).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    settings.AWS_REGION,
    "AWS_REGION",
    "LCSC_CACHE_DIR",
    settings.STORAGE_MAX_ATTEMPTS,
    settings.STORAGE_CONNECT_TIMEOUT_S,
    settings.STORAGE_READ_TIMEOUT_S,
)
# The driver's static keys: sent to stage actors only when a spec sets `storage.forward_credentials`, never to a job.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def forwarded_env(forward_credentials: bool = False) -> dict[str, str]:
    """This process's storage settings (`FORWARDED_ENV`) that are set, plus its keys (`CREDENTIAL_ENV`) only with
    `forward_credentials`. Never log the result: with the keys it holds a secret."""
    names = FORWARDED_ENV + (CREDENTIAL_ENV if forward_credentials else ())
    return {name: os.environ[name] for name in names if os.environ.get(name)}


AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")


class JobError(LcscCheckfreeError):
    """A submitted job failed or was stopped; the message carries the end of its logs."""


class JobAuthError(JobError):
    """The cluster refused the Jobs API request: token authentication is on and no or a wrong token was sent."""


def resolve_auth_token() -> str | None:
    """The cluster's token, as Ray looks for it: $RAY_AUTH_TOKEN, the file named by $RAY_AUTH_TOKEN_PATH,
    then `~/.ray/auth_token` (only when $RAY_AUTH_MODE is `token`). None when there is none."""
    token = settings.env_str(AUTH_TOKEN)
    if token is not None:
        return token
    path_name = settings.env_str(AUTH_TOKEN_PATH)
    if path_name is not None:
        path = Path(path_name).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise JobAuthError(
                f"cannot read the Ray auth token file {path} (from ${AUTH_TOKEN_PATH}): "
                f"{exc.strerror}; point ${AUTH_TOKEN_PATH} at the file holding the cluster's "
                "token"
            ) from None
        if not token:
            raise JobAuthError(
                f"the Ray auth token file {path} (from ${AUTH_TOKEN_PATH}) is empty; write the "
                "cluster's token into it"
            )
        return token
    default = DEFAULT_TOKEN_FILE.expanduser()
    if (settings.env_str(AUTH_MODE) or "").lower() != "token" or not default.is_file():
        return None
    try:
        return default.read_text().strip() or None
    except OSError as exc:
        raise JobAuthError(
            f"cannot read the Ray auth token file {default}: {exc.strerror}; fix its permissions "
            f"or set ${AUTH_TOKEN_PATH} to the file holding the cluster's token"
        ) from None


def auth_headers(token: str | None) -> dict[str, str]:
    """The HTTP headers that carry `token` to the Ray dashboard (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _connect(address: str, token: str | None) -> JobSubmissionClient:
    """A Jobs API client that sends `token`; a refusal becomes a `JobAuthError` that names the fix."""
    from ray.exceptions import AuthenticationError

    try:
        return JobSubmissionClient(address, headers=auth_headers(token))
    except AuthenticationError:
        given = "the token given was refused" if token else "no token was given"
        raise JobAuthError(
            f"the Ray cluster at {address} requires token authentication and {given}; set ${AUTH_TOKEN} to "
            f"the cluster's token or ${AUTH_TOKEN_PATH} to a file holding it (see cluster/README.md)"
        ) from None


class LocalHead:
    """A Ray head on this machine (`ray start --head --block`), stopped by `close()`."""

    def __init__(self, num_cpus: int | None = None, timeout_s: float = 120.0):
        self.process, self.gcs_address, self.dashboard_url = start_head(num_cpus)
        try:
            wait_for_dashboard(self.dashboard_url, self.process, timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            self.close()
            raise JobError(f"the local Ray head did not start: {exc}") from None

    def close(self) -> None:
        """Stop the head (only the processes of its own `ray start`)."""
        stop_process_group(self.process)


class JobHandle(Generic[ResultT]):
    """A submitted job: `status()`, `wait()`, `result()`, `logs()`, `stop()`, `close()`."""

    def __init__(
        self,
        client: JobSubmissionClient,
        job_id: str,
        output_uri: str,
        result_model: type[ResultT],
        head: LocalHead | None = None,
    ):
        self.client, self.job_id, self.output_uri = client, job_id, output_uri
        self.result_model, self.head = result_model, head

    def status(self) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        return str(self.client.get_job_status(self.job_id).value)

    def logs(self) -> str:
        """Everything the job printed so far."""
        return self.client.get_job_logs(self.job_id)

    def stop(self) -> None:
        """Ask Ray to stop the job."""
        self.client.stop_job(self.job_id)

    def wait(self, timeout_s: float | None = None, poll_s: float = 1.0, echo: bool = False) -> str:
        """Block until the job ends; raise `JobError` (with the log tail) unless it succeeded."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        printed = 0
        while True:
            status = self.client.get_job_status(self.job_id)
            if echo:
                text = self.logs()
                sys.stderr.write(text[printed:])
                printed = len(text)
            if status.is_terminal():
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {status.value} after {timeout_s}s")
            time.sleep(poll_s)
        if status != JobStatus.SUCCEEDED:
            tail = "\n".join(self.logs().splitlines()[-30:])
            raise JobError(f"job {self.job_id} ended {status.value}; last log lines:\n{tail}")
        return str(status.value)

    def result(self) -> ResultT:
        """The job's result, read from `output_uri/result.json`."""
        data = artifacts.read_json(storage.join(self.output_uri, RESULT_FILE))
        return parse_spec(data, self.result_model, source=storage.join(self.output_uri, RESULT_FILE))

    def close(self) -> None:
        """Stop the local head this handle started, if any."""
        if self.head is not None:
            self.head.close()
            self.head = None

    def __enter__(self) -> JobHandle[ResultT]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def absolutize_output(spec: BaseModel) -> BaseModel:
    """A copy of `spec` whose local output path is absolute (the job's working directory differs)."""
    uri = spec.output.uri
    if storage.is_remote(uri):
        return spec
    path = Path(storage.parse_uri(uri).key).expanduser().resolve()
    return spec.model_copy(update={"output": spec.output.model_copy(update={"uri": str(path)})})


def _submit_with_retry(
    client: JobSubmissionClient, entrypoint: str, runtime_env: dict, name: str, timeout_s: float = 180.0
) -> str:
    """Submit, retrying while a freshly started head's job agent is not up yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, metadata={"spec_name": name}
            )
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def submit_spec(
    spec: BaseModel,
    module: str,
    command: str,
    result_model: type[ResultT],
    address: str | None = None,
    extra_args: list[str] | None = None,
) -> JobHandle[ResultT]:
    """Submit `python -m module command spec.yaml` as a Ray job; return its handle."""
    address = address or settings.env_str(settings.RAY_ADDRESS)
    head = None
    if address is None:
        head = LocalHead(num_cpus=getattr(spec.ray, "num_cpus", None))
        address = head.dashboard_url
        python = sys.executable  # the head runs on this machine, with this interpreter
        spec = absolutize_output(spec)
        env_vars = {}
    else:
        python = "python"
        env_vars = forwarded_env()  # the job's driver uses the cluster's credentials
    spec = spec.model_copy(update={"ray": spec.ray.model_copy(update={"address": None})})
    workdir = Path(tempfile.mkdtemp(prefix="lcsc-job-"))
    dump_spec(spec, workdir / "spec.yaml")
    args = " ".join(shlex.quote(a) for a in (extra_args or []))
    entrypoint = f"{shlex.quote(python)} -m {module} {command} spec.yaml {args}".strip()
    try:
        client = _connect(address, resolve_auth_token())
        runtime_env = {"working_dir": str(workdir)}
        if env_vars:
            runtime_env["env_vars"] = env_vars
        job_id = _submit_with_retry(client, entrypoint, runtime_env, str(getattr(spec, "name", "")))
    except Exception:
        if head is not None:
            head.close()
        raise
    log.info("submitted job %s to %s: %s", job_id, address, entrypoint)
    return JobHandle(client, job_id, spec.output.uri, result_model, head)
