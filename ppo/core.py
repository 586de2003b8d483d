"""The maths of PPO for language models, as pure functions on tensors and masks.

Shapes: a rollout is `[batch, T]` over response tokens (right-padded); `mask` is 1 on real response tokens (up to
and including the stop token) and 0 after. Everything here is in fp32 and has no model, optimiser or I/O in it, so
each piece can be checked by hand (docs/ppo.md lists the checks; tests/test_ppo_core.py holds them).
"""
import torch
import torch.nn.functional as F

KL_ESTIMATORS = ("k1", "k3")


# --- log-probabilities and entropy --------------------------------------------------------------------------------

def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature), in fp32. Sampling happened at `temperature`, so every
    recomputation must divide by it too, or the first PPO ratio is not 1."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: logsumexp(l) - sum(softmax(l) * l)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


# --- masked statistics --------------------------------------------------------------------------------------------

def this_process(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                total=this_process) -> torch.Tensor:
    """`total` (with no `dim`): sums a tensor over every process, for the mean of the whole batch."""
    mask = mask.to(values.dtype)
    if dim is None:
        return total((values * mask).sum()) / total(mask.sum()).clamp_min(1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, total=this_process) -> torch.Tensor:
    """Variance over the masked entries (Bessel-corrected unless `unbiased` is False); `total` as in masked_mean."""
    mean = masked_mean(values, mask, total=total)
    variance = masked_mean((values - mean) ** 2, mask, total=total)
    count = total(mask.to(values.dtype).sum())
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  total=this_process) -> torch.Tensor:
    """(values - mean) / std over the masked entries; with shift_mean False the mean is added back. Padding
    comes out as 0. `total`: sums a tensor over every process, so that the mean and std are the whole batch's
    (by default this process's rows are the batch)."""
    mean, variance = masked_mean(values, mask, total=total), masked_var(values, mask, total=total)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# --- responses ----------------------------------------------------------------------------------------------------

def response_mask(responses: torch.Tensor, stop_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended): the mask covers each response up to and including its first stop token, or all of it when
    there is none; `ended` says which responses stopped. Found by position, never by the pad id, because the
    bundled model pads with its stop token."""
    is_stop = responses == stop_token_id
    ended = is_stop.any(-1)
    first_stop = torch.where(ended, is_stop.float().argmax(-1), torch.full_like(ended, responses.shape[1] - 1,
                                                                                 dtype=torch.long))
    positions = torch.arange(responses.shape[1], device=responses.device)
    return (positions[None, :] <= first_stop[:, None]).long(), ended


# --- KL and rewards -----------------------------------------------------------------------------------------------

def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy, with
    log r = ref_logprob - logprob: k1 = -log r (unbiased, can be negative), k3 = r - 1 - log r (unbiased,
    never negative, lower variance)."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got '{estimator}'")


def penalised_scores(scores: torch.Tensor, ended: torch.Tensor, missing_eos_penalty: float | None) -> torch.Tensor:
    """The reward model's scores, minus `missing_eos_penalty` for responses that never emitted the stop token."""
    if missing_eos_penalty is None:
        return scores
    return scores - missing_eos_penalty * (~ended).to(scores.dtype)


def repetition_penalties(distinct_shares: torch.Tensor, floor: float | None, penalty: float) -> torch.Tensor:
    """What each answer loses for repeating itself: nothing while at least `floor` of its 4-grams are distinct, then
    in proportion to the shortfall, `penalty` at a share of 0 (floor None: nothing)."""
    if floor is None:
        return torch.zeros_like(distinct_shares)
    return penalty * (floor - distinct_shares).clamp_min(0) / floor


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl on every response token, plus the sequence's score on its last real token.
    So rewards.sum(-1) == score - kl_coef * (kl * mask).sum(-1)."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(-1).clamp_min(1) - 1
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


# --- advantages ---------------------------------------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backwards over the response:
    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and r zero after the
    response ends. Returns (advantages, returns = advantages + values), padding zeroed."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


# --- critic-free advantages ---------------------------------------------------------------------------------------
# The batch holds groups of `group_size` answers to one prompt, each group's rows contiguous. Sequence-level
# advantages ([batch]) are spread over a response's tokens by `per_token`.

GROUP_SCALES = ("group", "none")


def grpo_advantages(scores: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, section 4.1.2): each answer's score less its
    group's mean, divided by the group's standard deviation (Bessel-corrected, plus 1e-4). With scale "none" the
    division is left out, as Dr. GRPO argues (Liu et al. 2025, arXiv:2503.20783): dividing by the
    std weights the groups whose answers barely differ, the too easy and the too hard prompts, the most. A group
    whose answers all score alike gets zero advantage."""
    if scale not in GROUP_SCALES:
        raise ValueError(f"scale must be one of {', '.join(GROUP_SCALES)}, got '{scale}'")
    groups = scores.float().view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(-1, keepdim=True) + 1e-4)
    return centred.flatten()


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740; after Kool et al. 2019): each answer's score
    less the mean score of the other group_size - 1 answers to its prompt, a baseline that does not depend on the
    answer itself. Equals group_size / (group_size - 1) times the score less the whole group's mean."""
    groups = scores.float().view(-1, group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).flatten()


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            total=this_process) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): per token, the return from that token on, the per-token
    rewards carrying the KL penalty (`token_rewards`), then whitened over every token of the batch (`total`: as
    in masked_whiten): the batch's mean is the baseline, no critic and no group. [batch, T], padding zeroed."""
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)
    return masked_whiten(returns, mask, total=total)


def per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence-level advantage ([batch]) on every token of its response ([batch, T])."""
    return advantages[:, None] * mask.to(advantages.dtype)


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's KL term, added to the loss rather than to the reward (Shao et al. 2024, equation 4): the k3 estimate
    of KL(policy || reference) averaged over the response tokens; its gradient goes through `logprobs`. Padding is
    left out before the estimate: exp of a padded position's log-ratio can overflow, and inf x 0 is NaN."""
    live = mask.bool()
    return masked_mean(kl_estimate(logprobs.where(live, 0.0), ref_logprobs.where(live, 0.0), "k3"), mask)


# --- losses -------------------------------------------------------------------------------------------------------

def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), with its
    diagnostics: clip fraction, approx KL 0.5 * mean(log ratio^2), ratio mean and variance."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
                 "ratio_mean": masked_mean(ratio, mask), "ratio_var": masked_var(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict]:
    """0.5 * mean over tokens of max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2), and the share of
    tokens where the clipped term won."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


# --- KL coefficient -----------------------------------------------------------------------------------------------

class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al.'s proportional controller: moves the coefficient towards the KL target, at most 20% per
    `horizon` steps: value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
