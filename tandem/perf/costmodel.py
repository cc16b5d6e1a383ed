"""The engine cost model: how long one continuous-batching iteration takes.

One iteration processes P prefill tokens (whose attention covers A query-key pairs) and one new
token for each of B decoding sequences whose contexts add up to C tokens:

    t = overhead + max(weight_read, per_token * (P + B)) + attn_pair * A + kv_read * C

The max() is the roofline of the linear layers: small batches are bound by streaming the weights
from HBM, large ones by matmul FLOPs. Prefill attention grows with the square of the prompt;
decode attention reads every context token's KV once per step. The engine simulator process, the
discrete-event simulator, the router's TTFT estimate and the autoscaler all call these functions,
so a live run and a simulated run share one notion of time.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.perf.profile import CostParams, Profile


def attention_pairs(new_tokens: int, cached_tokens: int) -> int:
    """Causal attention pairs of ``new_tokens`` appended after ``cached_tokens`` of context.

    An exact integer (n(n+1) is even): the router adds and subtracts these per request, and its
    accounting must return to zero."""
    return new_tokens * cached_tokens + new_tokens * (new_tokens + 1) // 2


@dataclass(frozen=True, slots=True)
class CostModel:
    """Step times from a profile's coefficients, with an optional slow-down factor (fault injection)."""

    params: CostParams
    kv_bytes_per_token: int
    slowdown: float = 1.0

    @classmethod
    def from_profile(cls, profile: Profile, slowdown: float = 1.0) -> CostModel:
        return cls(profile.params, profile.model.kv_bytes_per_token, slowdown)

    def step_time(self, prefill_tokens: int, attn_pairs: float, decode_batch: int,
                  decode_context: int) -> float:
        p = self.params
        linear = max(p.weight_read_s, p.per_token_s * (prefill_tokens + decode_batch))
        t = p.step_overhead_s + linear + p.attn_pair_s * attn_pairs + p.kv_read_s_per_token * decode_context
        return t * self.slowdown

    def prefill_time(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """One prompt prefilled alone, in one iteration."""
        return self.step_time(new_tokens, attention_pairs(new_tokens, cached_tokens), 0, 0)

    def decode_step_time(self, batch: int, context_tokens: int) -> float:
        return self.step_time(0, 0.0, batch, context_tokens)

    def decode_steps_time(self, batch: int, context_tokens: int, steps: int) -> float:
        """``steps`` consecutive decode iterations of an unchanged batch; context grows by ``batch`` each."""
        if steps <= 0:
            return 0.0
        p = self.params
        per_step = p.step_overhead_s + max(p.weight_read_s, p.per_token_s * batch)
        grown = steps * context_tokens + batch * steps * (steps - 1) / 2
        return (steps * per_step + p.kv_read_s_per_token * grown) * self.slowdown

    def decode_steps_within(self, batch: int, context_tokens: int, budget_s: float) -> int:
        """How many whole decode iterations of an unchanged batch fit in ``budget_s`` (at least 0)."""
        if self.decode_steps_time(batch, context_tokens, 1) <= 0:
            raise ValueError("a decode step takes no time under this profile")
        # The closed form and a step-by-step sum can differ in the last bit; a step that ends
        # exactly at the budget has fitted, so allow that rounding.
        budget_s *= 1 + 1e-12
        lo, hi = 0, 1
        while self.decode_steps_time(batch, context_tokens, hi) <= budget_s:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.decode_steps_time(batch, context_tokens, mid) <= budget_s:
                lo = mid
            else:
                hi = mid
        return lo

    def prefill_seconds_per_token(self, context_tokens: int = 0) -> float:
        """Marginal prefill cost of one more uncached token at a given context length.

        This is the ``t_prefill`` in DualMap's TTFT estimate (queued miss tokens x seconds per token).
        """
        return (self.params.per_token_s + self.params.attn_pair_s * context_tokens) * self.slowdown

    def kv_transfer_time(self, tokens: int, link_gbps: float, rtt_s: float = 0.0) -> float:
        """KV of ``tokens`` over a link of ``link_gbps`` Gbit/s, after one round trip."""
        if link_gbps <= 0:
            raise ValueError("link_gbps must be positive")
        return rtt_s + tokens * self.kv_bytes_per_token * 8 / (link_gbps * 1e9)
