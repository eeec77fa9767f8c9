"""Which files are sorted: the config keys ``include`` and ``exclude``, rules on header values.

::

    include:              # sorted only when every rule here matches (none: every file)
      Modality: [MR, CT]
    exclude:              # left out when any rule here matches
      SeriesDescription: {regex: "(?i)localizer|scout"}
      ImageType: {contains: DERIVED}

A rule on a DICOM keyword is text (the value equals it), ``{glob: ...}`` (a shell pattern,
case-insensitive), ``{regex: ...}`` (a Python regular expression found anywhere in the
value), ``{contains: ...}`` (one of the values of a multi-valued tag, split at ``\\``,
equals it), or a list of these (any of them). Values are compared as the manifest holds
them, as text; a missing or empty tag is the empty text.

The plan applies the filters to the files it has not placed yet: a file left out is never
copied, and is listed in ``skipped.csv`` with the rule that left it out; a file placed
earlier stays placed whatever the filters say later. Parsing is standard library only (the
Snakefile validates the config at every start); pyarrow is imported by the jobs that
evaluate the rules.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from dcmsort import dictionary

if TYPE_CHECKING:
    import pyarrow as pa

KEYS = ("include", "exclude")
OPERATORS = ("glob", "regex", "contains")
MULTI_VALUE_SEPARATOR = "\\"
REASON_PREFIX = "left out by the filter"


class FilterError(ValueError):
    """A filter rule that cannot work; the message names the key and the fix."""


@dataclass(frozen=True)
class Rule:
    """One keyword's rule: the tests (operator, text) of which any must match."""

    key: str  # include or exclude
    keyword: str
    tests: tuple[tuple[str, str], ...]  # ("equals" | OPERATORS, text)

    def describe(self) -> str:
        """The rule as a user wrote it, for a skip reason."""
        texts = [text if op == "equals" else f"{{{op}: {text}}}" for op, text in self.tests]
        shown = texts[0] if len(texts) == 1 else f"[{', '.join(texts)}]"
        return f"{self.key} {self.keyword}: {shown}"

    def matches(self, value: str) -> bool:
        return any(_test(op, text)(value) for op, text in self.tests)


@cache
def _test(op: str, text: str) -> Callable[[str], bool]:
    if op == "glob":
        pattern = re.compile(fnmatch.translate(text.casefold()))
        return lambda value: pattern.match(value.casefold()) is not None
    if op == "regex":
        return re.compile(text).search
    if op == "contains":
        return lambda value: text in value.split(MULTI_VALUE_SEPARATOR)
    return lambda value: value == text


@dataclass(frozen=True)
class Filters:
    """The include and exclude rules of a run (no rules: every file is sorted)."""

    include: tuple[Rule, ...] = ()
    exclude: tuple[Rule, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    @property
    def keywords(self) -> list[str]:
        """The DICOM keywords the rules read (the manifests must carry them)."""
        return sorted({rule.keyword for rule in (*self.include, *self.exclude)})

    def to_json(self) -> str:
        """The rules as JSON, in the order given (the first rule that decides is named)."""
        return json.dumps(
            {
                key: {r.keyword: [list(t) for t in r.tests] for r in getattr(self, key)}
                for key in KEYS
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str) -> Filters:
        data = json.loads(text or "{}")
        return cls(
            **{
                key: tuple(
                    Rule(key, keyword, tuple((op, value) for op, value in tests))
                    for keyword, tests in data.get(key, {}).items()
                )
                for key in KEYS
            }
        )

    def reason(self, values: Mapping[str, str | None]) -> str | None:
        """Why a file with these header values is left out (None: it is sorted)."""
        for rule in self.include:
            if not rule.matches(values.get(rule.keyword) or ""):
                return f"{REASON_PREFIX} {rule.describe()} (not matched)"
        for rule in self.exclude:
            if rule.matches(values.get(rule.keyword) or ""):
                return f"{REASON_PREFIX} {rule.describe()}"
        return None

    def reasons(self, table: pa.Table) -> pa.Array:
        """``reason`` of every row of a manifest table, computed once per distinct
        combination of the rules' values (few: modalities, descriptions), not per file."""
        import pyarrow as pa
        import pyarrow.compute as pc

        keywords = self.keywords
        if not keywords or table.num_rows == 0:
            return pa.nulls(table.num_rows, pa.string())
        values = pa.table(
            {
                k: pc.fill_null(table[k].cast(pa.string()), "")
                if k in table.column_names
                else pa.array([""] * table.num_rows, pa.string())
                for k in keywords
            }
        )
        distinct = values.group_by(keywords, use_threads=False).aggregate([])
        found = [self.reason(combination) for combination in distinct.to_pylist()]
        distinct = distinct.append_column("_reason", pa.array(found, pa.string()))
        rows = values.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
        joined = rows.join(distinct, keys=keywords, use_threads=False).sort_by("_row")
        return joined["_reason"].combine_chunks()


def parse(config: Mapping[str, Any]) -> Filters:
    """The Filters of a schema-validated config; raises FilterError naming the key."""
    rules: dict[str, tuple[Rule, ...]] = {}
    for key in KEYS:
        given = config.get(key) or {}
        if not isinstance(given, Mapping):
            raise FilterError(
                f"{key} must be a mapping of DICOM keyword to rule, e.g. {key}: "
                "{Modality: [MR, CT]}, not " + repr(given)
            )
        rules[key] = tuple(_rule(key, str(keyword), value) for keyword, value in given.items())
    return Filters(**rules)


def _rule(key: str, keyword: str, value: object) -> Rule:
    where = f"{key}.{keyword}"
    if dictionary.tag_for_keyword(keyword) is None:
        raise FilterError(
            f"{key} names '{keyword}', which is not a DICOM keyword"
            f"{dictionary.keyword_hint(keyword)}; a rule is "
            f"keyword: value, e.g. {key}: {{Modality: [MR, CT]}}"
        )
    items = value if isinstance(value, list) else [value]
    if not items:
        raise FilterError(
            f"{where} is an empty list, which no file matches; give a value, or leave {keyword} out"
        )
    return Rule(key, keyword, tuple(_test_of(where, item) for item in items))


def _test_of(where: str, item: object) -> tuple[str, str]:
    if isinstance(item, str):
        return "equals", item
    if isinstance(item, Mapping) and len(item) == 1:
        ((op, text),) = item.items()
        if op in OPERATORS and isinstance(text, str):
            if op == "regex":
                try:
                    re.compile(text)
                except re.error as error:
                    raise FilterError(
                        f"{where} has the regex {text!r}, which is not a regular expression "
                        f"({error}); see the regex examples in config/README.md"
                    ) from None
            return op, text
    if isinstance(item, bool | int | float) or item is None:
        raise FilterError(
            f"{where}: {item!r} is not text; filter values are compared as text: quote it, "
            f'e.g. "{item}" (YAML reads 1 as a number and 0123 as 83)'
        )
    raise FilterError(
        f"{where}: {item!r} is not a rule; use text, a list, or one of "
        + ", ".join(f"{{{op}: ...}}" for op in OPERATORS)
    )


NO_FILTERS = Filters()
