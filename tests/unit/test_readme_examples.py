"""The README shows examples/sse_relay.py; the copy there must stay the tested file."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_embeds_the_sse_relay_verbatim() -> None:
    relay = (ROOT / "examples" / "sse_relay.py").read_text().rstrip("\n")
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{relay}\n```" in readme
    assert f"in {len(relay.splitlines())} lines of Starlette" in readme
