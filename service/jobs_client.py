"""Ray Jobs API calls (`ray.job_submission.JobSubmissionClient`) with Ray's token auth, and one-line errors.

Token auth (Ray ≥ 2.52; on by default for local clusters in 2.60): the head enforces it when started with
`RAY_AUTH_MODE=token`, and every client must send the cluster's token. Ray looks for the token, highest precedence
first, in `RAY_AUTH_TOKEN` (the token itself), `RAY_AUTH_TOKEN_PATH` (a file holding it) and `~/.ray/auth_token`.
We read it the same way and send it as an explicit `Authorization: Bearer` header, so the client works whatever
auth mode the current process's Ray config cached earlier. `RAY_AUTH_MODE=disabled` sends nothing.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from rankmerge.workers.errors import MergeInputError

log = logging.getLogger(__name__)
DEFAULT_DASHBOARD_PORT = 8265
TOKEN_FIX = ("set RAY_AUTH_MODE=token and put the cluster's token in ~/.ray/auth_token "
             "(or RAY_AUTH_TOKEN, or a file named by RAY_AUTH_TOKEN_PATH); `ray get-auth-token` on the head prints it")


def dashboard_url(address: str) -> str:
    """`http://HOST:8265` from `HOST`, `HOST:PORT` or a full http(s) URL; anything else is a user error."""
    text = address.strip()
    if "://" not in text:
        text = f"http://{text}"
    url = urlparse(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise MergeInputError(f"Ray dashboard address {address!r} is not http(s)://HOST:PORT",
                              f"pass e.g. --address http://10.0.0.5:{DEFAULT_DASHBOARD_PORT} (the head's dashboard port)")
    try:
        port = url.port or DEFAULT_DASHBOARD_PORT
    except ValueError:
        raise MergeInputError(f"Ray dashboard address {address!r} has a bad port", "pass e.g. --address http://HEAD:8265") from None
    return f"{url.scheme}://{url.hostname}:{port}"


def find_token() -> str | None:
    """The cluster token by Ray's own precedence, or None (auth disabled, or no token anywhere)."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise MergeInputError(f"RAY_AUTH_TOKEN_PATH names {path}, which cannot be read ({exc.strerror})",
                                  "point it at the file holding the cluster's token") from None
        if not token:
            raise MergeInputError(f"RAY_AUTH_TOKEN_PATH names {path}, which is empty", "put the cluster's token in it")
    if not token:
        default = Path.home() / ".ray" / "auth_token"
        token = default.read_text().strip() if default.is_file() else ""
    if not token and mode == "token":
        raise MergeInputError("RAY_AUTH_MODE=token but no Ray auth token was found", TOKEN_FIX)
    return token or None


def driver_command(spec_path: Path, resume: bool) -> str:
    """The entrypoint of one attempt: the job's driver on the cluster. Only the (quoted) spec path comes from the job."""
    words = ["rankmerge", "run", str(spec_path), "--executor", "ray", "--address", "auto"]
    if resume:
        words.append("--resume")
    return shlex.join(words)


class HeadUnreachable(MergeInputError):
    """The dashboard does not answer: a watcher waits for it (or a new --address); a command reports it."""


class UnknownSubmission(MergeInputError):
    """The head does not know this attempt (it was restarted, or the attempt ran on another head)."""


@dataclass(frozen=True)
class AttemptInfo:
    status: str  # a Ray JobStatus value, or LOST when the head does not know the submission
    exit_code: int | None
    message: str | None


class JobsClient:
    """The few Ray Jobs API calls the service makes; every failure of the connection or the token is one line."""

    def __init__(self, address: str) -> None:
        self.url = dashboard_url(address)
        token = find_token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        with self._errors():
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.url, headers=headers)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        from ray.exceptions import AuthenticationError
        from requests.exceptions import ConnectionError as RequestsConnectionError

        try:
            yield
        except AuthenticationError as exc:
            problem = "rejected the auth token" if "Invalid" in str(exc) or "403" in str(exc) else "requires an auth token"
            raise MergeInputError(f"the Ray head at {self.url} {problem}", TOKEN_FIX) from None
        except (ConnectionError, RequestsConnectionError) as exc:
            raise HeadUnreachable(f"no Ray dashboard answers at {self.url} ({str(exc).splitlines()[0][:120]})",
                                  "check --address (the head's dashboard port, 8265 by default) and that it runs "
                                  "`ray start --head --include-dashboard=true`") from None

    def submit(self, entrypoint: str, metadata: dict[str, str]) -> str:
        with self._errors():
            return self._client.submit_job(entrypoint=entrypoint, metadata=metadata)

    def info(self, submission_id: str) -> AttemptInfo:
        with self._errors():
            try:
                info = self._client.get_job_info(submission_id)
            except RuntimeError as exc:  # the SDK's "Request failed with status code 404"
                if "404" in str(exc) or "does not exist" in str(exc):
                    return AttemptInfo("LOST", None, "the Ray head does not know this submission (head restarted?)")
                raise
        return AttemptInfo(str(info.status.value), info.driver_exit_code, info.message)

    def logs(self, submission_id: str) -> str:
        with self._errors():
            return self._client.get_job_logs(submission_id)

    def tail(self, submission_id: str) -> Iterator[str]:
        """Chunks of the driver log as the driver writes them, until the attempt ends (what `ray job logs --follow`
        streams, over the dashboard's websocket); the SDK's async iterator, driven here one chunk at a time."""
        import asyncio

        loop = asyncio.new_event_loop()
        stream = self._client.tail_job_logs(submission_id)
        try:
            while True:
                with self._errors(), self._stream_errors(submission_id):
                    try:
                        chunk = loop.run_until_complete(anext(stream))
                    except StopAsyncIteration:
                        return
                yield chunk
        finally:
            loop.run_until_complete(stream.aclose())
            loop.close()

    @contextmanager
    def _stream_errors(self, submission_id: str) -> Iterator[None]:
        """The websocket's failures as one line: the head does not know the attempt, or went away mid-stream."""
        from aiohttp import ClientError, WSServerHandshakeError

        try:
            yield
        except WSServerHandshakeError as exc:
            if exc.status == 404:
                raise UnknownSubmission(f"the Ray head at {self.url} does not know attempt {submission_id}") from None
            raise HeadUnreachable(f"the Ray head at {self.url} refused to stream logs (HTTP {exc.status})",
                                  "check --address and the token") from None
        except (ClientError, RuntimeError) as exc:
            raise HeadUnreachable(f"the log stream from {self.url} broke before the attempt ended ({str(exc)[:120]})",
                                  "check that the head runs, then `rankmerge logs JOB --follow` again") from None

    def stop(self, submission_id: str) -> bool:
        with self._errors():
            return bool(self._client.stop_job(submission_id))

    def submissions(self) -> list[tuple[str, str, dict[str, str]]]:
        """(submission id, status, metadata) of every job the head knows."""
        with self._errors():
            return [(j.submission_id or "", str(j.status.value), dict(j.metadata or {})) for j in self._client.list_jobs()]
