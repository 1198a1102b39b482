"""The README shows examples/sse_relay.py; the copy there must stay the tested file."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_embeds_the_sse_relay_verbatim() -> None:
    relay = (ROOT / "examples" / "sse_relay.py").read_text().rstrip("\n")
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{relay}\n```" in readme
    assert f"in {len(relay.splitlines())} lines of Starlette" in readme


def test_readme_documents_every_setting() -> None:
    from chatprocessor.settings import Settings

    readme = (ROOT / "README.md").read_text()
    missing = [
        name.upper()
        for name in Settings.model_fields
        if f"`{name.upper()}`" not in readme
        # the rate-limit periods share one row: `RATE_LIMIT_PER_MINUTE` ... `_PER_HOUR`, ...
        and f"`_{name.upper().removeprefix('RATE_LIMIT')[1:]}`" not in readme
    ]
    assert missing == []
