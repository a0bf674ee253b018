"""Cache affinity: which replica group a request should go to so that its prompt finds its KV cache there.

Every turn of a conversation resends the whole history, and a replica group's prefix cache holds only what
that group computed: turn k+1 is cheap on the group that served turn k and costs a full prefill anywhere
else. So the stage gives every request an *affinity key*, the same for all turns of one conversation
(`AffinityKey.for_request`):

- the client's `prompt_cache_key` (OpenAI's field for this very purpose), else
- its `user`, else
- a digest of the conversation's opening: the first user turn with the system prompt (and any tool schemas)
  folded in, which every later turn resends unchanged; for `/v1/completions`, the prompt's first
  `COMPLETION_KEY_TOKENS` tokens.

The router (`replica/router.py`) runs in every stage replica, so the choice must come out the same in each
of them without their talking to each other. `choose_group` ranks the groups by rendezvous hashing of the
key (highest random weight): every router computes the same order from the key and the group ids alone,
and when a group joins or leaves only the keys whose first choice it is move. Two guards keep one group from
being buried under hot keys: a group with `capacity` requests in flight (what its engine runs and lets wait;
one more would be refused with 429) goes to the end of the order, so the request tries the key's next group
first; and when the preferred group has more than `max_imbalance` requests in flight beyond the least loaded
one, the least loaded one goes first. Neither is sticky: once the load evens out, the key's own group is
first again.

No Ray here: the policy is plain functions, tested on their own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

KeySource = Literal["prompt_cache_key", "user", "conversation", "prompt"]
RouteReason = Literal["affinity", "load_guard", "full"]
# Prompts of `/v1/completions` that share this many leading tokens go to one group.
COMPLETION_KEY_TOKENS = 64

Group = TypeVar("Group")


@dataclass(frozen=True)
class AffinityKey:
    """What the router places a request by: a digest (never the client's text) and where it came from."""

    digest: str
    source: KeySource

    @classmethod
    def of(cls, source: KeySource, text: str) -> AffinityKey:
        return cls(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest(), source)

    @classmethod
    def for_request(cls, prompt_cache_key: str | None, user: str | None, opening: str) -> AffinityKey:
        """The client's key when it names one, else the conversation's `opening`."""
        if prompt_cache_key:
            return cls.of("prompt_cache_key", prompt_cache_key)
        if user:
            return cls.of("user", user)
        return cls.of("conversation", opening)

    @classmethod
    def for_prompt(cls, prompt_cache_key: str | None, user: str | None, token_ids: Sequence[int]) -> AffinityKey:
        """`for_request` for a raw prompt: its first `COMPLETION_KEY_TOKENS` tokens stand for the opening."""
        if prompt_cache_key or user:
            return cls.for_request(prompt_cache_key, user, "")
        return cls.of("prompt", ",".join(map(str, token_ids[:COMPLETION_KEY_TOKENS])))


@dataclass(frozen=True)
class RouteChoice:
    """The groups to try, best first, and why the first is first."""

    order: list
    reason: RouteReason


def rendezvous_order(digest: str, groups: Sequence[Group], group_id: Callable[[Group], str]) -> list[Group]:
    """`groups` by descending weight hash(digest, group id): the same order wherever it is computed."""
    def weight(group: Group) -> bytes:
        return hashlib.blake2b(f"{digest}:{group_id(group)}".encode(), digest_size=8).digest()

    return sorted(groups, key=weight, reverse=True)


def choose_group(key: AffinityKey, groups: Sequence[Group], group_id: Callable[[Group], str],
                 in_flight: Callable[[Group], int], max_imbalance: int, capacity: int | None = None) -> RouteChoice:
    """Rendezvous order for `key`, with the groups at `capacity` moved to the end (reason `full` when that
    moved the key's first group); else, when the first group is more than `max_imbalance` requests busier
    than the least loaded group, that group goes first (`load_guard`)."""
    order = rendezvous_order(key.digest, groups, group_id)
    loads = {id(group): in_flight(group) for group in order}
    if capacity is not None:
        open_groups = [group for group in order if loads[id(group)] < capacity]
        if open_groups and open_groups[0] is not order[0]:
            return RouteChoice(open_groups + [group for group in order if loads[id(group)] >= capacity], "full")
    lightest = min(order, key=lambda group: loads[id(group)])  # the first of equals, so also stable
    if loads[id(order[0])] - loads[id(lightest)] > max_imbalance:
        return RouteChoice([lightest, *(group for group in order if group is not lightest)], "load_guard")
    return RouteChoice(order, "affinity")
