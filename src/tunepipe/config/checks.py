"""What every config group shares: defaults, the secret keys, and the helpers that check values."""

from __future__ import annotations

from tunepipe.errors import TunepipeError

DEFAULT_MODEL = "smollm2-135m-instruct"
# The date templates render unless data.template_date says otherwise: the date Llama 3.1's own
# chat template falls back to when it has no clock, so a pipeline is reproducible by default.
DEFAULT_TEMPLATE_DATE = "2024-07-26"


# Keys whose values are credentials: never tracked, dumped, logged or shown in an error.
SECRET_KEYS = frozenset({"model.hf_hub_token"})


def shown_value(where: str, value) -> str:
    """`value` as an error message may show it: a secret key's value never is."""
    return "<hidden>" if where in SECRET_KEYS else repr(value)


def require(ok: bool, group: str, key: str, value, why: str) -> None:
    if not ok:
        raise TunepipeError(f"{group}.{key}={value!r}: {why}")


def name_list(value) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [str(item).strip() for item in items if str(item).strip()]


def mapping_value(value, key: str) -> dict:
    """A mapping-valued key given as a mapping or as its JSON text."""
    if isinstance(value, str):
        import json

        text = value
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise TunepipeError(f"train.{key}={text!r}: must be a mapping or its JSON text",
                                hint=f'e.g. {key}: {{"key": "value"}} in YAML, or its JSON text on the command line')
    return dict(value or {})
