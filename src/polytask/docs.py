"""Documentation generated from the registries (so the tables never drift).

Regenerate with ``python -m polytask.docs methods > docs/methods.md`` and
``python -m polytask.docs archs > docs/archs.md``.
"""

from __future__ import annotations

import sys

import polytask


def _summary(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()
    return doc[0].strip() if doc else ""


def methods_markdown() -> str:
    """A markdown table of every registered method: name, family, summary, paper, needs."""
    lines = [
        "# Balancing methods",
        "",
        "Generated from the registry by `python -m polytask.docs methods > docs/methods.md`; "
        "a test fails when this file is out of date.",
        "",
        "Families: *loss* = a function of the losses, one backward pass; *gramian* = weights "
        "from G = J J^T, update = weights @ J; *jacobian* = needs the task gradients themselves.",
        "*partial steps*: whether `backward(..., present=mask)` accepts a step that holds only "
        "some tasks (multi-input MTL, missing labels).",
        "*distributed*: whether `polytask.distributed.distribute` makes it balance the global "
        "batch of several processes (docs/distributed.md).",
        "",
        "| name | family | modes | summary | paper | needs | partial steps | distributed "
        "| claimed properties |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, cls in polytask.methods.METHODS.items():
        needs = [", ".join(sorted(cls.needs)) or "losses"]
        if cls.needs_losses_after_step:
            needs.append("`after_step(losses)` after each optimizer step")
        if cls.needs_meta_step:
            needs.append("`meta_step(...)` with a validation batch")
        if cls.stochastic:
            needs.append("stochastic: `seed=`")
        props = ", ".join(sorted(cls.properties)) or "—"
        modes = ", ".join(sorted(cls.modes))
        partial = "yes" if cls.partial_tasks else "no"
        distributed = "no" if cls.needs_meta_step or not cls.distributable else "yes"
        lines.append(
            f"| `{name}` | {cls.family} | {modes} | {_summary(cls)} | {cls.paper} | "
            f"{'; '.join(needs)} | {partial} | {distributed} | {props} |"
        )
    return "\n".join(lines) + "\n"


def archs_markdown() -> str:
    """A markdown table of every registered architecture: name, summary, paper."""
    lines = [
        "# Architectures",
        "",
        "Generated from the registry by `python -m polytask.docs archs > docs/archs.md`; "
        "a test fails when this file is out of date.",
        "",
        "*features mode*: the architecture has one shared representation (`encode`/`decode`), "
        'so gradient methods can balance `mode="features"`.',
        "",
        "| name | summary | paper | features mode |",
        "| --- | --- | --- | --- |",
    ]
    for name, cls in polytask.archs.ARCHS.items():
        features = "yes" if cls.has_shared_representation else "no"
        lines.append(f"| `{name}` | {_summary(cls)} | {cls.paper} | {features} |")
    return "\n".join(lines) + "\n"


TABLES = {"methods": methods_markdown, "archs": archs_markdown}

if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "methods"
    if which not in TABLES:
        raise SystemExit(f"usage: python -m polytask.docs [{'|'.join(TABLES)}]")
    print(TABLES[which](), end="")
