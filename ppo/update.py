"""Steps 4-8 of a PPO update, on a finished rollout: reference log-probs and values, per-token rewards with the
KL penalty, advantages, then several epochs of shuffled minibatch updates of the policy and the critic.

The critic is a sequence classifier (initialised from the reward model) read at every response position: its
backbone's hidden states through its score head give one value per token (`Critic`, a module of its own so that
DDP sees its forward). Gradients go through `accelerator.backward`, so they are averaged over processes.
"""
import contextlib
from dataclasses import dataclass

import torch

from ppo.core import (entropy_from_logits, gae, grpo_advantages, kl_estimate, kl_loss, logprobs_from_logits,
                      masked_mean, masked_whiten, per_token, policy_loss, reinforce_pp_advantages, rloo_advantages,
                      this_process, token_rewards, value_loss)
from ppo.rollout import Rollout
from ppo.sharding import is_sharded
from ppo.zero3 import is_engine
from rlhf.reward_model import reward_pooling


def full_sequences(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids) of prompt + response, positions counted from the first real token."""
    ids = torch.cat([rollout.query_ids, rollout.response_ids], 1)
    mask = torch.cat([rollout.query_mask, rollout.response_mask.to(rollout.query_mask)], 1)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def length_groups(rollout: Rollout, rows: torch.Tensor, groups: int) -> list[tuple[torch.Tensor, int]]:
    """`rows` (indices into the rollout) sorted by prompt length and split into `groups` passes, each with the
    number of leading columns that are left padding in all of its rows. A pass that drops them computes the
    same numbers on fewer tokens: the default run's prompts run from 40 to 160 tokens, so a batch padded to its
    longest is up to 40% padding (measured: two passes of 4 rows take 4.5 s where one of 8 takes 5.5 s, forward
    and backward; one pass per row is slower than either). Returns (positions in `rows`, columns to drop) per
    pass."""
    lengths = rollout.query_mask[rows].sum(-1)
    # sorted by (length, row): the same rows give the same passes whatever order they come in
    order = sorted(range(len(rows)), key=lambda i: (lengths[i].item(), rows[i].item()))
    size = -(-len(order) // max(1, groups))
    width = rollout.query_ids.shape[1]
    passes = []
    for start in range(0, len(order), size):
        members = torch.tensor(order[start:start + size], device=rows.device)
        passes.append((members, width - int(lengths[members].max())))
    return passes


def grouped(forward, rollout: Rollout, rows: torch.Tensor | None, groups: int) -> tuple[torch.Tensor, ...]:
    """`forward(ids, mask, positions, response_start)` run once per length group on that group's rows without
    their shared left padding; its outputs ([rows, ...] each) put back in the order of `rows`."""
    if rows is None:
        rows = torch.arange(rollout.query_ids.shape[0], device=rollout.query_ids.device)
    sequences = full_sequences(rollout)
    passes = length_groups(rollout, rows, groups)
    pieces = []
    for members, trim in passes:
        ids, mask, positions = (t[rows[members], trim:] for t in sequences)
        pieces.append(forward(ids, mask, positions, rollout.query_ids.shape[1] - trim))
    inverse = torch.cat([members for members, _ in passes]).argsort()
    return tuple(torch.cat(outputs)[inverse] for outputs in zip(*pieces))


def policy_forward(policy, rollout: Rollout, temperature: float, rows: torch.Tensor | None = None,
                   groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies) of the response tokens, [rows, T], fp32, logits divided by the temperature. Only the
    positions that predict response tokens go through the LM head; the entropy is a statistic, kept out of the
    graph."""
    length = rollout.response_ids.shape[1]

    def forward(ids, mask, positions, response_start):
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions,
                        logits_to_keep=length + 1).logits[:, :-1]
        logits = logits.float() / temperature
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
        return logprobs_from_logits(logits, ids[:, response_start:]), entropy

    return grouped(forward, rollout, rows, groups)


class Critic(torch.nn.Module):
    """Per-token values from a sequence classifier: its backbone's hidden states through its score head, an
    ensemble's heads averaged into one value, on the scale PPO's scores are given in. A critic that starts as the
    reward model must start on the normalised scale (score - mean) / std too: on the raw scale its values would
    be a larger copy of the score, and the advantages, returns minus values, would point against the reward.

    The value of a state is the reward model's score of the answer so far, read the way the reward model pools:
    with `last_token`, the head at the state's last token; with `answer_mean`, the running mean of the head over
    the answer's tokens so far (from the token that opens the reply). The head at one token alone is then only
    that token's share of the mean: as a value it swings from token to token, and the advantages, sums of its
    differences, would be mostly that swing."""

    def __init__(self, classifier, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.classifier, self.mean, self.std = classifier, mean, std
        self.running_mean = reward_pooling(classifier) == "answer_mean"

    def forward(self, input_ids, attention_mask, position_ids, response_start: int) -> torch.Tensor:
        """[rows, response length] the values of the states before each response token."""
        backbone = getattr(self.classifier, self.classifier.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids).last_hidden_state[:, response_start - 1:-1]
        per_token = (self.classifier.score(hidden).float().mean(-1) - self.mean) / self.std
        if not self.running_mean:
            return per_token
        counts = torch.arange(1, per_token.shape[1] + 1, device=per_token.device)
        return per_token.cumsum(-1) / counts


def critic_forward(critic, rollout: Rollout, rows: torch.Tensor | None = None, groups: int = 1) -> torch.Tensor:
    """Values of the response positions, [rows, T]: the state after each response token's predecessor, as the
    log-probs are (position t-1 predicts token t)."""
    def forward(ids, mask, positions, response_start):
        return (critic(input_ids=ids, attention_mask=mask, position_ids=positions, response_start=response_start),)

    return grouped(forward, rollout, rows, groups)[0]


@dataclass
class Experience:
    """What the update epochs need, fixed for the whole update."""
    rollout: Rollout
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    live_values: torch.Tensor | None = None  # old_values with their graph, for the first minibatch to reuse
    ref_logprobs: torch.Tensor | None = None  # GRPO: the reference, for the KL term of its loss
    loss_kl_coef: float = 0.0  # GRPO: that term's weight (the others carry the KL in the reward)


@torch.no_grad()
def reference_logprobs(policy, reference, rollout: Rollout, temperature: float, groups: int = 1) -> torch.Tensor:
    """Log-probs under the frozen reference; with LoRA (`reference` None) the reference is the policy with its
    adapter switched off for this pass."""
    if reference is not None:
        return policy_forward(reference, rollout, temperature, groups=groups)[0]
    with policy.disable_adapter():
        return policy_forward(policy, rollout, temperature, groups=groups)[0]


@torch.no_grad()
def recomputed_logprobs(policy, rollout: Rollout, temperature: float, groups: int = 1) -> torch.Tensor:
    """The policy's log-probs of its sampled responses from one full forward pass, as the update computes them.
    In half precision, generation's token-by-token logits (KV cache) round differently from a full forward's
    (~0.005 nats per token in bf16): without this a run would start with a KL to its identical reference, and
    a ratio off 1, that are only rounding."""
    return policy_forward(policy, rollout, temperature, groups=groups)[0] * rollout.response_mask


def reuses_first_values(config) -> bool:
    """With one minibatch and no accumulation, the first minibatch holds every row and meets the critic before any
    step: its values are the old values, so the critic forward that makes them can keep its graph and serve as the
    first minibatch's forward (one critic pass fewer per update)."""
    return config.num_mini_batches == 1 and config.gradient_accumulation_steps == 1


def make_experience(rollout: Rollout, ref_logprobs: torch.Tensor, critic, scores: torch.Tensor, kl_coef: float,
                    config, total=this_process) -> Experience:
    """`total`: sums a tensor over every process (masked_whiten), so that advantages are whitened over the whole
    batch and N processes train as one."""
    if critic is None:
        return critic_free_experience(rollout, ref_logprobs, scores, kl_coef, config, total)
    mask = rollout.response_mask
    keep_graph = reuses_first_values(config) and torch.is_grad_enabled()
    with torch.set_grad_enabled(keep_graph):
        live_values = critic_forward(critic, rollout, groups=config.forward_groups)
    values = live_values.detach() * mask
    kl = kl_estimate(rollout.logprobs, ref_logprobs * mask, config.kl_estimator) * mask
    rewards = token_rewards(scores, kl, mask, kl_coef)
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, total=total)
    advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    advantages = masked_whiten(advantages, mask, total=total)
    return Experience(rollout, rollout.logprobs, values, advantages, returns, kl, rewards,
                      live_values if keep_graph else None)


def critic_free_experience(rollout: Rollout, ref_logprobs: torch.Tensor, scores: torch.Tensor, kl_coef: float,
                           config, total=this_process) -> Experience:
    """GRPO, RLOO and REINFORCE++: advantages from the scores of the answers alone (ppo/core.py), no values.
    GRPO compares the raw scores within each prompt's group and puts the KL in its loss; RLOO compares the
    KL-penalised sequence rewards within the group; REINFORCE++ whitens the KL-penalised returns over the batch."""
    mask = rollout.response_mask
    ref_logprobs = ref_logprobs * mask
    kl = kl_estimate(rollout.logprobs, ref_logprobs, config.kl_estimator) * mask
    rewards = token_rewards(scores, kl, mask, kl_coef)
    if config.algorithm == "grpo":
        advantages = per_token(grpo_advantages(scores, config.group_size, config.scale_rewards), mask)
    elif config.algorithm == "rloo":
        advantages = per_token(rloo_advantages(rewards.sum(-1), config.group_size), mask)
    else:
        advantages = reinforce_pp_advantages(rewards, mask, config.gamma, total)
    zeros = torch.zeros_like(advantages)
    return Experience(rollout, rollout.logprobs, zeros, advantages, zeros, kl, rewards, ref_logprobs=ref_logprobs,
                      loss_kl_coef=kl_coef if config.algorithm == "grpo" else 0.0)


def ppo_epochs(policy, critic, optimizer, experience: Experience, config, generator: torch.Generator,
               accelerator) -> list[dict]:
    """num_ppo_epochs passes of shuffled minibatches (each split into gradient-accumulation micro-batches) of
    this process's share of the rollout; returns one stats dict per minibatch, in order."""
    batch = experience.rollout.response_ids.shape[0]
    minibatch = batch // config.num_mini_batches
    micro = minibatch // config.gradient_accumulation_steps
    engine = is_engine(optimizer)  # DeepSpeed's engine scales, accumulates, clips and steps itself
    parameters = [] if engine else [p for group in optimizer.param_groups for p in group["params"]]
    history = []
    for _ in range(config.num_ppo_epochs):
        order = torch.randperm(batch, generator=generator)
        for start in range(0, batch, minibatch):
            stats = []
            tokens = minibatch_tokens(experience.rollout.response_mask[order[start:start + minibatch]], accelerator)
            for micro_start in range(start, start + minibatch, micro):
                rows = order[micro_start:micro_start + micro]
                last = micro_start + micro >= start + minibatch
                with contextlib.nullcontext() if engine or last else kept_local(accelerator, policy, critic):
                    loss, micro_stats = minibatch_loss(policy, critic, experience, rows, config)
                    loss = loss * token_share(experience.rollout.response_mask[rows], tokens, accelerator)
                    if engine:  # DeepSpeed divides each micro-batch's loss by the accumulation steps itself
                        optimizer.backward(loss * config.gradient_accumulation_steps)
                        optimizer.step()  # an optimiser step at the last micro-batch of each minibatch
                    else:
                        accelerator.backward(loss)
                stats.append(micro_stats)
            if not engine:
                accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            history.append({key: sum(s[key] for s in stats) / len(stats) for key in stats[0]})
    return history


def kept_local(accelerator, policy, critic) -> contextlib.ExitStack:
    """Gradients of a micro-batch before a minibatch's last stay on this process (DDP's no_sync, entered before the
    forward): the last one's backward averages the sum once, not at every micro-batch. Sharded (FSDP2), every
    micro-batch reduce-scatters: held back, the gradients would stay whole on every process."""
    stack = contextlib.ExitStack()
    if is_sharded(accelerator):
        return stack
    for model in (policy, critic):
        if model is not None:
            stack.enter_context(accelerator.no_sync(model))
    return stack


def minibatch_tokens(mask: torch.Tensor, accelerator) -> torch.Tensor:
    """The real tokens of the global minibatch: this process's rows of it, summed over processes."""
    tokens = mask.sum().float()
    return (tokens if accelerator.num_processes == 1 else accelerator.reduce(tokens.clone(), reduction="sum")
            ).clamp_min(1)


def token_share(mask: torch.Tensor, minibatch: torch.Tensor, accelerator) -> torch.Tensor:
    """A micro-batch's real tokens over the global minibatch's (`minibatch`), times the processes. Each micro-batch's
    loss is a mean over its own tokens, the micro-batches' gradients add up and the processes' are averaged:
    weighted by this share, every token of the global minibatch counts alike, as in one process with one micro-batch
    (1 there), whatever the micro-batches' and processes' lengths."""
    return mask.sum().float() * accelerator.num_processes / minibatch


def minibatch_loss(policy, critic, experience: Experience, rows: torch.Tensor, config) -> tuple[torch.Tensor, dict]:
    mask = experience.rollout.response_mask[rows]
    logprobs, entropy = policy_forward(policy, experience.rollout, config.temperature, rows, config.forward_groups)
    pg_loss, pg_stats = policy_loss(logprobs, experience.old_logprobs[rows], experience.advantages[rows], mask,
                                    config.cliprange)
    stats = {"loss/policy_avg": pg_loss.item(), "policy/entropy_avg": masked_mean(entropy, mask).item(),
             "policy/approxkl_avg": pg_stats["approxkl"].item(), "policy/clipfrac_avg": pg_stats["clipfrac"].item(),
             "val/ratio": pg_stats["ratio_mean"].item(), "val/ratio_var": pg_stats["ratio_var"].item()}
    if critic is None:
        if not experience.loss_kl_coef:
            return pg_loss, stats
        kl_term = kl_loss(logprobs, experience.ref_logprobs[rows], mask)
        return pg_loss + experience.loss_kl_coef * kl_term, {**stats, "loss/kl_avg": kl_term.item()}
    if experience.live_values is not None:  # the first minibatch: every row, the critic not yet stepped
        values, experience.live_values = experience.live_values[rows], None
    else:
        values = critic_forward(critic, experience.rollout, rows, config.forward_groups)
    vf_loss, vf_stats = value_loss(values, experience.old_values[rows], experience.returns[rows], mask,
                                   config.cliprange_value)
    stats.update({"loss/value_avg": vf_loss.item(), "val/clipfrac_avg": vf_stats["vf_clipfrac"].item()})
    return pg_loss + config.vf_coef * vf_loss, stats
