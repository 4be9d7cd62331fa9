"""One exception family, so callers can catch everything nla-rl raises about bad input.

Every message says what is wrong, the expected and the found value where there are some, and how
to fix it.
"""


class NLAError(ValueError):
    """Base class of every input error nla-rl raises."""


class ConfigError(NLAError):
    """A recipe or command-line override is invalid (unknown key, wrong type, bad value)."""


class SidecarError(NLAError):
    """An ``nla_meta.yaml`` sidecar is missing, malformed, or disagrees with the tokenizer/model."""


class InjectionError(NLAError):
    """Activation vectors or marker positions cannot be injected as asked."""


def mismatch(field: str, expected, found, fix: str = "") -> str:
    """The standard wording for 'field has the wrong value': name, expected, found, fix."""
    msg = f"{field}: expected {expected!r}, found {found!r}"
    return f"{msg}. {fix}" if fix else msg
