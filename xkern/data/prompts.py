"""Every prompt template of xkern, in one place, so all models read the same text.

History titles are listed oldest to newest (most recent last) and cut to the MAX_HISTORY most
recent. Three shapes: a pointwise cross-encoder pair (history + one candidate), a shared prefix for
log-likelihood scoring of candidate titles, and a listwise prompt with numbered candidates (the
WeaveRec generative format).
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_HISTORY = 15
UNTITLED = "(untitled item)"

HISTORY_HEADER = "A customer bought these {domain}items, oldest first:"
HISTORY_LINE = "{n}. {title}"
CANDIDATE_TEMPLATE = "Candidate item: {title}"
POINTWISE_QUESTION = "Will the customer buy the candidate item next?"
NEXT_ITEM_PREFIX = "The customer's next purchase is:"
LISTWISE_HEADER = "Candidate items:"
LISTWISE_INSTRUCTION = "Answer with the title of the candidate item the customer will buy next."


def titles_of(items: Sequence[int], titles: Sequence[str]) -> list[str]:
    """Item indices -> titles (empty titles become UNTITLED)."""
    return [titles[i] or UNTITLED for i in items]


def history_block(
    history_titles: Sequence[str], domain: str | None = None, max_items: int = MAX_HISTORY
) -> str:
    """Numbered history, oldest first, keeping the `max_items` most recent titles."""
    recent = list(history_titles)[-max_items:] if max_items > 0 else []
    header = HISTORY_HEADER.format(domain=f"{domain} " if domain else "")
    lines = [HISTORY_LINE.format(n=n, title=t or UNTITLED) for n, t in enumerate(recent, start=1)]
    return "\n".join([header, *lines])


def pointwise_prompt(
    history_titles: Sequence[str],
    candidate_title: str,
    domain: str | None = None,
    max_items: int = MAX_HISTORY,
) -> str:
    """Cross-encoder input: the history, then one candidate."""
    return "\n".join(
        [
            history_block(history_titles, domain, max_items),
            CANDIDATE_TEMPLATE.format(title=candidate_title or UNTITLED),
            POINTWISE_QUESTION,
        ]
    )


def next_item_prompt(
    history_titles: Sequence[str], domain: str | None = None, max_items: int = MAX_HISTORY
) -> str:
    """Shared prefix for scoring each candidate title by its log-likelihood as the continuation."""
    return "\n".join([history_block(history_titles, domain, max_items), NEXT_ITEM_PREFIX])


def candidate_continuation(candidate_title: str) -> str:
    """The text whose log-likelihood is scored after `next_item_prompt`."""
    return " " + (candidate_title or UNTITLED)


def listwise_prompt(
    history_titles: Sequence[str],
    candidate_titles: Sequence[str],
    domain: str | None = None,
    max_items: int = MAX_HISTORY,
) -> str:
    """Generative listwise input: history, numbered candidates, instruction."""
    cands = [HISTORY_LINE.format(n=n, title=t or UNTITLED) for n, t in enumerate(candidate_titles, start=1)]
    return "\n".join(
        [history_block(history_titles, domain, max_items), LISTWISE_HEADER, *cands, LISTWISE_INSTRUCTION]
    )
