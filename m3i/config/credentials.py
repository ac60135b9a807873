"""What looks like a credential, by name or by value: one rule for the config and the Helm chart.

Settings that end up in plain text (``launch.env`` in a ConfigMap and in the pod spec, the
Helm chart's ``pipeline.hook.schedule.params`` in a Job's arguments) must never carry a
secret: credentials reach pods only by reference to a Kubernetes Secret. These patterns are
written in the subset of regular expressions that Python's ``re`` and Go's RE2 (which Helm's
JSON-schema validator uses) read alike, and the chart's ``values.schema.json`` holds them
verbatim (a test compares them).

A name is refused when it matches :data:`CREDENTIAL_ENV_NAME` and not
:data:`CREDENTIAL_FILE_ENV_NAME`, both case-insensitive and matched whole. Names are read
as words split by ``_``.

Refused (examples): ``AWS_SECRET_ACCESS_KEY``, ``AWS_ACCESS_KEY_ID``, ``AWS_SESSION_TOKEN``,
``MINIO_ROOT_USER``, ``DB_PASSWORD``, ``SMTP_PASSWD``, ``GPG_PASSPHRASE``, ``DB_CREDENTIAL``,
``AZURE_CREDENTIALS``, ``HF_TOKEN``, ``HFTOKEN``, ``WANDB_API_KEY``, ``GITHUB_APIKEY``,
``SSHKEY``, ``REDIS_PASS``, ``GITHUB_PAT``, ``BASIC_AUTH``, ``OAUTH_CLIENT``,
``HTTP_AUTHORIZATION``, ``BEARER``, ``TLS_PRIVATE_KEY``, ``GPG_PRIVATE``, ``SESSION_COOKIE``,
``aws_secret`` (a pipeline parameter), and plain ``KEY``, ``TOKEN``, ``PASS``, ``PAT``, ``AUTH``.

Passed (examples users need): ``PATH``, ``PYTHONPATH``, ``LD_LIBRARY_PATH``, ``PWD``,
``NCCL_SOCKET_IFNAME``, ``NCCL_IB_HCA``, ``TORCH_NCCL_ASYNC_ERROR_HANDLING``,
``OMP_NUM_THREADS``, ``TOKENIZERS_PARALLELISM``, ``PYTHONHASHSEED``, ``KEYBOARD``,
``AUTHOR``, ``AUTHORS``, ``PATTERN``, ``COMPASS_MODE``, ``AWS_REGION``, and names that point
at a file holding a credential rather than holding one (their last word is ``FILE``, ``PATH``
or ``DIR``, or the name is ``GOOGLE_APPLICATION_CREDENTIALS``): ``AWS_SHARED_CREDENTIALS_FILE``,
``AWS_WEB_IDENTITY_TOKEN_FILE``, ``MINIO_ROOT_PASSWORD_FILE``, ``SSH_KEY_PATH``.

Known false positives (refused, rename them): a word ``KEY`` that is no secret
(``PARTITION_KEY``, ``SORT_KEY``), a word ``PRIVATE`` or ``AUTH`` used as a switch
(``PRIVATE_REGISTRY``, ``AUTH_ENABLED``), any name containing ``SECRET`` or ``CREDENTIAL``.

A value is refused when :data:`CREDENTIAL_VALUE` finds in it the shape of a well-known secret:
an AWS access key id (``AKIA...``/``ASIA...``), a GitHub, GitLab, Hugging Face, Slack, OpenAI-style
(``sk-...``) or Google API token, a PEM private key, a JSON Web Token, or a URL with a password
(``scheme://user:password@host``). A value with none of these shapes passes, whatever it holds: a
bare 40-character AWS secret access key looks like any hash, so its name must give it away.
"""

from __future__ import annotations

import re

__all__ = [
    "CREDENTIAL_ENV_NAME",
    "CREDENTIAL_FILE_ENV_NAME",
    "CREDENTIAL_VALUE",
    "is_credential_name",
    "is_credential_value",
]

CREDENTIAL_ENV_NAME = (
    r"MINIO_ROOT_[A-Z0-9_]*"
    r"|[A-Z0-9_]*(SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL)[A-Z0-9_]*"
    r"|([A-Z0-9_]*_)?([A-Z0-9]*TOKENS?|(API|ACCESS|AUTH|SSH|PRIVATE)?KEYS?|PASS|PAT|O?AUTH|AUTHORIZATION|BEARER"
    r"|PRIVATE|COOKIES?)(_[A-Z0-9_]*)?"
)
"""Names that look like credentials (case-insensitive, matched whole): ``MINIO_ROOT_*``; any name
containing ``SECRET``, ``PASSWORD``, ``PASSWD``, ``PASSPHRASE`` or ``CREDENTIAL``; a name with a word
ending in ``TOKEN(S)``, or a word ``KEY(S)``, ``APIKEY``, ``ACCESSKEY``, ``AUTHKEY``, ``SSHKEY``,
``PRIVATEKEY``, ``PASS``, ``PAT``, ``AUTH``, ``OAUTH``, ``AUTHORIZATION``, ``BEARER``, ``PRIVATE`` or
``COOKIE(S)``. :data:`CREDENTIAL_FILE_ENV_NAME` names the exceptions."""

CREDENTIAL_FILE_ENV_NAME = r"GOOGLE_APPLICATION_CREDENTIALS|[A-Z0-9_]*_(FILE|PATH|DIR)"
"""Names that point at a credential file rather than hold a credential (case-insensitive, matched
whole): the last word is ``FILE``, ``PATH`` or ``DIR``, or Google's ``GOOGLE_APPLICATION_CREDENTIALS``."""

_B = r"(^|[^A-Za-z0-9_-])"  # a token starts the value or follows a non-token character
CREDENTIAL_VALUE = (
    rf"{_B}(AKIA|ASIA)[0-9A-Z]{{16}}($|[^0-9A-Z])"
    rf"|{_B}(gh[pousr]_[A-Za-z0-9]{{30,}}|github_pat_[A-Za-z0-9_]{{22,}}|glpat-[A-Za-z0-9_-]{{20,}}|hf_[A-Za-z0-9]{{30,}}"
    rf"|xox[abposr]-[A-Za-z0-9-]{{10,}}|sk-[A-Za-z0-9_-]{{20,}}|AIza[0-9A-Za-z_-]{{35}})"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\."
    r"|[A-Za-z][A-Za-z0-9+.-]*://[^/:@ ]*:[^/@ ]+@"
)
"""Values that hold a well-known secret's shape (searched anywhere, case-sensitive): AWS access key
ids, GitHub (``ghp_``, ``github_pat_``), GitLab (``glpat-``), Hugging Face (``hf_``), Slack (``xox?-``),
OpenAI-style (``sk-``) and Google (``AIza``) tokens, PEM private keys, JSON Web Tokens, and URLs with a
password (``postgresql://user:pw@db``, ``redis://:pw@host``)."""

_NAME = re.compile(rf"^({CREDENTIAL_ENV_NAME})$", re.IGNORECASE)
_FILE_NAME = re.compile(rf"^({CREDENTIAL_FILE_ENV_NAME})$", re.IGNORECASE)
_VALUE = re.compile(CREDENTIAL_VALUE)


def is_credential_name(name: str) -> bool:
    """Whether an env var or parameter name looks like it holds a credential (see the module docstring)."""
    return bool(_NAME.match(name)) and not _FILE_NAME.match(name)


def is_credential_value(value: str) -> bool:
    """Whether a value holds the shape of a well-known secret (see :data:`CREDENTIAL_VALUE`)."""
    return bool(_VALUE.search(value))
