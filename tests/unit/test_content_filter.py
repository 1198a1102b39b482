"""Per-tenant content filters: replacements, counts, isolation between tenants, the metric."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import REGISTRY

from chatprocessor.features.content_filter import ContentFilter, TenantFilters


def filtered_count(tenant: str) -> float:
    return REGISTRY.get_sample_value("ai_content_filtered_total", {"tenant_id": tenant}) or 0.0


def tenant_name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"  # the metric is process-wide: fresh labels per test


# --- ContentFilter ------------------------------------------------------------------------------


def test_matches_are_replaced_and_counted() -> None:
    content = ContentFilter([r"\bdamn\b", r"\d{4}-\d{4}-\d{4}-\d{4}"])
    text, count = content.apply("damn, card 1234-5678-9012-3456 and damn again; damnation stays")
    assert text == "[filtered], card [filtered] and [filtered] again; damnation stays"
    assert count == 3


def test_no_match_changes_nothing() -> None:
    content = ContentFilter([r"secret"])
    assert content.apply("nothing to hide") == ("nothing to hide", 0)


def test_case_sensitive_unless_the_pattern_says_so() -> None:
    assert ContentFilter(["acme"]).apply("ACME and acme") == ("ACME and [filtered]", 1)
    assert ContentFilter(["(?i)acme"]).apply("ACME and acme") == ("[filtered] and [filtered]", 2)


def test_custom_replacement() -> None:
    content = ContentFilter([r"\bfoo\b"], replacement="***")
    assert content.apply("foo bar foo") == ("*** bar ***", 2)


def test_overlapping_matches_become_one_replacement_in_any_order() -> None:
    text = "call 555-1234 now"
    for patterns in ([r"555-\d+", r"\d+-1234"], [r"\d+-1234", r"555-\d+"]):
        assert ContentFilter(patterns).apply(text) == ("call [filtered] now", 1)
    # a later pattern never matches an earlier one's replacement
    assert ContentFilter(["bad", "filtered"]).apply("bad") == ("[filtered]", 1)
    # adjacent (not overlapping) matches stay two
    assert ContentFilter(["bad"]).apply("badbad") == ("[filtered][filtered]", 2)


def test_empty_filter() -> None:
    content = ContentFilter([])
    assert content.empty
    assert content.apply("anything") == ("anything", 0)
    assert not ContentFilter(["x"]).empty


def test_zero_width_matches_replace_nothing() -> None:
    assert ContentFilter([r"(?=x)y?x"]).apply("axb") == ("a[filtered]b", 1)
    assert ContentFilter([r"\bword(?=s)"]).apply("words") == ("[filtered]s", 1)


def test_bad_pattern_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match=r"pattern '\(unclosed' is not a valid regular expression"):
        ContentFilter(["ok", "(unclosed"])


@pytest.mark.parametrize("pattern", ["", "a*", "(x)?", "^"])
def test_a_pattern_matching_the_empty_string_is_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="matches the empty string"):
        ContentFilter([pattern])


def test_a_bare_string_is_not_a_list_of_patterns() -> None:
    with pytest.raises(TypeError):
        ContentFilter("secret")
    with pytest.raises(TypeError, match="tenant 'acme'"):
        TenantFilters({"acme": "secret"})


# --- TenantFilters ------------------------------------------------------------------------------


def test_tenant_patterns_never_touch_another_tenants_text() -> None:
    a, b = tenant_name(), tenant_name()
    filters = TenantFilters({a: ["competitor"], b: ["refund"]})
    text = "Ask our competitor for a refund"
    assert filters.apply(a, text) == "Ask our [filtered] for a refund"
    assert filters.apply(b, text) == "Ask our competitor for a [filtered]"
    assert filters.apply(tenant_name(), text) == text  # no filters at all
    assert filters.for_tenant(tenant_name()).empty


def test_default_patterns_apply_to_every_tenant() -> None:
    a, unknown = tenant_name(), tenant_name()
    filters = TenantFilters({a: ["competitor"]}, default=[r"(?i)password"], replacement="<x>")
    text = "Your Password is not shared with our competitor"
    assert filters.apply(a, text) == "Your <x> is not shared with our <x>"
    assert filters.apply(unknown, text) == "Your <x> is not shared with our competitor"
    assert len(filters.for_tenant(a).patterns) == 2
    assert len(filters.for_tenant(unknown).patterns) == 1


def test_metric_counts_changed_answers_per_tenant() -> None:
    a, b = tenant_name(), tenant_name()
    filters = TenantFilters({a: ["spam"], b: ["spam"]})
    assert filters.apply(a, "spam spam spam") == "[filtered] [filtered] [filtered]"
    filters.apply(a, "clean")
    filters.apply(a, "more spam")
    assert filtered_count(a) == 2  # answers changed, not replacements
    assert filtered_count(b) == 0


def test_bad_tenant_pattern_names_the_tenant_and_the_pattern() -> None:
    with pytest.raises(ValueError, match=r"tenant 'acme': content filter pattern '\[a-' is not"):
        TenantFilters({"ok": ["fine"], "acme": ["[a-"]})
    with pytest.raises(ValueError, match=r"content filter pattern '\*\*' is not"):
        TenantFilters({}, default=["**"])
