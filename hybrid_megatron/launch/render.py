"""sbatch scripts from the Jinja templates in `templates/` (one per job kind).

Commands are lists of shell words: plain strings are quoted, `Raw` words are written as they
are (for words the job script expands at run time, such as "$MASTER_ADDR:$MASTER_PORT").
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

import jinja2


class Raw(str):
    """A shell word written unquoted into the script (expanded when the job runs)."""


def word(w: str) -> str:
    return str(w) if isinstance(w, Raw) else shlex.quote(str(w))


def words(ws: Sequence[str]) -> str:
    return " ".join(word(w) for w in ws)


def double_quoted(value: str) -> str:
    """The value in double quotes, $VARIABLES left to the shell (for environment values)."""
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
    return f'"{escaped}"'


def command_lines(groups: Sequence[Sequence[str]], indent: str = "    ") -> str:
    """A bash array body: one group of words per line."""
    return "\n".join(indent + words(g) for g in groups if g)


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("hybrid_megatron.launch", "templates"),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,
)
_ENV.filters.update(q=word, dq=double_quoted, words=words, lines=command_lines)


def render(template: str, **context) -> str:
    """Render `templates/<template>` with `context` (every variable must be given)."""
    return _ENV.get_template(template).render(**context)
