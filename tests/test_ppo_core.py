"""PPO maths against hand-computed values: the checks docs/ppo.md lists."""
import math
import random
import statistics

import pytest
import torch

from ppo.core import (AdaptiveKLController, FixedKLController, entropy_from_logits, gae, kl_estimate,
                      logprobs_from_logits, masked_mean, masked_var, masked_whiten, penalised_scores, policy_loss,
                      repetition_penalties, response_mask, token_rewards, value_loss)


def test_identical_policy_and_reference_give_zero_kl_ratio_one_and_nothing_clipped():
    torch.manual_seed(0)
    logits, tokens = torch.randn(3, 5, 11), torch.randint(11, (3, 5))
    logprobs = logprobs_from_logits(logits, tokens, temperature=0.7)
    same = logprobs_from_logits(logits.clone(), tokens, temperature=0.7)
    mask = torch.ones(3, 5)
    assert torch.equal(kl_estimate(logprobs, same, "k1"), torch.zeros(3, 5))
    assert torch.equal(kl_estimate(logprobs, same, "k3"), torch.zeros(3, 5))
    _, stats = policy_loss(logprobs, same, torch.randn(3, 5), mask)
    assert abs(stats["ratio_mean"].item() - 1) < 1e-4 and stats["clipfrac"] == 0 and stats["approxkl"] < 1e-10
    values = torch.randn(3, 5)
    _, value_stats = value_loss(values, values, torch.randn(3, 5), mask)
    assert value_stats["vf_clipfrac"] == 0


def test_logprobs_divide_by_the_temperature_and_entropy_matches_its_definition():
    logits, tokens = torch.tensor([[[1.0, 2.0, 0.5]]]), torch.tensor([[1]])
    expected = math.log(math.exp(2 / 0.5) / sum(math.exp(x / 0.5) for x in (1.0, 2.0, 0.5)))
    assert logprobs_from_logits(logits, tokens, 0.5).item() == pytest.approx(expected, rel=1e-6)
    p = torch.softmax(logits, -1)
    assert entropy_from_logits(logits).item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)


def test_gae_special_cases():
    torch.manual_seed(1)
    rewards, values, mask = torch.randn(2, 6), torch.randn(2, 6), torch.ones(2, 6)
    mask[1, 4:] = 0
    to_go = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(returns, to_go * mask, atol=1e-6)
    assert torch.allclose(advantages, (to_go - values) * mask, atol=1e-6)
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(2, 1)], 1)
    assert torch.allclose(advantages, (rewards + next_values - values) * mask, atol=1e-6)
    score, lam = 2.5, 0.9
    terminal = torch.zeros(1, 5)
    terminal[0, -1] = score
    _, returns = gae(terminal, torch.zeros(1, 5), torch.ones(1, 5), gamma=1.0, lam=lam)
    assert torch.allclose(returns[0], torch.tensor([score * lam ** (4 - t) for t in range(5)]), atol=1e-6)


def test_k3_is_never_negative_and_both_estimators_are_unbiased():
    torch.manual_seed(2)
    policy, reference = torch.softmax(torch.randn(6), 0), torch.softmax(torch.randn(6), 0)
    true_kl = (policy * (policy / reference).log()).sum().item()
    samples = torch.multinomial(policy, 400_000, replacement=True)
    logp, ref_logp = policy.log()[samples], reference.log()[samples]
    k1, k3 = kl_estimate(logp, ref_logp, "k1"), kl_estimate(logp, ref_logp, "k3")
    assert (k3 >= 0).all() and (k1 < 0).any()
    assert k1.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert k3.mean().item() == pytest.approx(true_kl, abs=0.01)
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate(logp, ref_logp, "k2")


def test_response_mask_finds_the_first_stop_token_by_position():
    stop = 7  # also the pad id of the bundled model: the mask must not stop at later sevens
    responses = torch.tensor([[3, 4, 7, 7, 7], [3, 7, 5, 7, 2], [1, 2, 3, 4, 5]])
    mask, ended = response_mask(responses, stop)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


def test_reward_assembly_puts_the_score_once_at_the_last_token_and_penalises_missing_eos():
    scores, ended = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([True, True, False])
    penalised = penalised_scores(scores, ended, missing_eos_penalty=1.0)
    assert penalised.tolist() == [1.0, -0.5, 1.0]  # only the response without EOS loses exactly the penalty
    kl = torch.rand(3, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    rewards = token_rewards(penalised, kl, mask, kl_coef=0.05)
    assert torch.allclose(rewards.sum(-1), penalised - 0.05 * (kl * mask).sum(-1), atol=1e-6)
    without_kl = token_rewards(penalised, torch.zeros(3, 4), mask, kl_coef=0.05)
    assert (without_kl != 0).sum(-1).tolist() == [1, 1, 1]
    assert [row.nonzero().item() for row in without_kl] == [2, 0, 3]


def test_the_repetition_penalty_grows_with_the_shortfall_below_the_floor():
    shares = torch.tensor([1.0, 0.6, 0.45, 0.15])
    assert repetition_penalties(shares, floor=0.6, penalty=2.0).tolist() == pytest.approx([0, 0, 0.5, 1.5])
    assert repetition_penalties(shares, floor=None, penalty=2.0).tolist() == [0, 0, 0, 0]


def test_policy_and_value_losses_by_hand():
    logp, old = torch.tensor([[math.log(1.5), math.log(0.5)]]), torch.zeros(1, 2)
    advantages, mask = torch.tensor([[1.0, -2.0]]), torch.ones(1, 2)
    loss, stats = policy_loss(logp, old, advantages, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(1.0, 1.6) = 1.6 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 1.6) / 2) and stats["clipfrac"].item() == 1.0
    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.1]]), torch.tensor([[0.0, 0.0]])
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # token 0: clipped value 0.7: max(1.0, 0.49) = 1.0; token 1: clipped 0.0: max(0, 0) = 0
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.0) / 2) and stats["vf_clipfrac"].item() == 0.0


def test_masked_statistics_ignore_padding():
    values, mask = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]]), torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mean(values, mask).item() == 2.5
    assert masked_var(values, mask).item() == pytest.approx(torch.tensor([1.0, 2, 3, 4]).var().item())
    whitened = masked_whiten(values, mask)
    assert whitened[:, 2].tolist() == [0.0, 0.0]
    assert masked_mean(whitened, mask).abs().item() < 1e-6
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, rel=1e-4)


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05
    adaptive = AdaptiveKLController(0.15, target=6.0, horizon=10_000)
    adaptive.update(6.0, 512)
    assert adaptive.value == 0.15  # at the target the coefficient does not move
    adaptive.update(600.0, 10_000)
    assert adaptive.value == pytest.approx(0.15 * 1.2)
    adaptive.update(0.0, 10_000)
    assert adaptive.value == pytest.approx(0.15 * 1.2 * 0.8)
    restored = AdaptiveKLController(1.0, 6.0, 10_000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value


def test_ppo_config_refuses_inconsistent_settings():
    from ppo.config import PPOStageConfig

    assert PPOStageConfig(total_episodes=64, batch_size=8).num_updates == 8
    assert PPOStageConfig(total_episodes=20, batch_size=8).num_updates == 3  # rounded up, as TRL does
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOStageConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="must divide"):
        PPOStageConfig(batch_size=6, num_mini_batches=4)
    with pytest.raises(ValueError, match="target_kl"):
        PPOStageConfig(target_kl=0.0)
    with pytest.raises(ValueError, match="kl_coef must be 0 or more, and above 0 with target_kl"):
        PPOStageConfig(kl_coef=0.0, target_kl=6.0)
    with pytest.raises(ValueError, match="kl_coef must be 0 or more"):
        PPOStageConfig(kl_coef=-0.1)
    with pytest.raises(ValueError, match=r"horizon \(1\) must be above batch_size / 5 \(1.6\)"):
        PPOStageConfig(batch_size=8, target_kl=6.0, horizon=1)  # kl_coef 0.05 -> -0.03 after one update at KL 0
    assert PPOStageConfig(batch_size=8, target_kl=6.0, horizon=2).horizon == 2  # at worst x 0.2 an update
    with pytest.raises(ValueError, match="logging_steps must be at least 1"):
        PPOStageConfig(logging_steps=0)
    with pytest.raises(ValueError, match="whiten_rewards whitens PPO's per-token rewards before GAE; grpo"):
        PPOStageConfig(algorithm="grpo", whiten_rewards=True)
    for floor in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"distinct_floor is a share of distinct 4-grams.*got {floor}"):
            PPOStageConfig(distinct_floor=floor)
    with pytest.raises(ValueError, match="distinct_penalty must be 0 or more"):
        PPOStageConfig(distinct_floor=0.6, distinct_penalty=-1.0)
    with pytest.raises(ValueError, match="algorithm must be one of ppo, grpo, rloo, reinforce_pp"):
        PPOStageConfig(algorithm="a2c")
    with pytest.raises(ValueError, match="num_generations must be at least 2"):
        PPOStageConfig(algorithm="rloo", num_generations=1)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        PPOStageConfig(algorithm="grpo", batch_size=8, num_generations=3)
    with pytest.raises(ValueError, match="scale_rewards"):
        PPOStageConfig(algorithm="grpo", scale_rewards="batch")
    # PPO samples one answer per prompt whatever num_generations says; the others num_generations each
    assert PPOStageConfig(batch_size=6, num_generations=4).group_size == 1
    assert PPOStageConfig(algorithm="reinforce_pp", batch_size=8, num_generations=1).group_size == 1
    assert PPOStageConfig(algorithm="grpo", batch_size=8).group_size == 4


def test_health_alerts_fire_on_each_sign_of_trouble_and_not_on_a_healthy_update():
    from ppo.config import PPOStageConfig
    from ppo.health import health_alerts

    config = PPOStageConfig(response_length=32, kl_alert=5.0)
    healthy = {"objective/kl": 1.0, "val/ratio": 1.01, "policy/clipfrac_avg": 0.05, "val/num_eos_tokens": 7,
               "episodes_per_update": 8, "val/response_length": 20.0, "val/min_response_length": 9.0}
    assert health_alerts(healthy, config) == {}
    troubles = {("KL", "KL to the reference"): {"objective/kl": 6.0},
                ("policy ratio", "mean policy ratio 1.300"): {"val/ratio": 1.3},
                ("policy ratio", "mean policy ratio 0.700"): {"val/ratio": 0.7},
                ("clip fraction", "clip fraction 0.40"): {"policy/clipfrac_avg": 0.4},
                ("stop token", "only 38% of responses emit the stop token"): {"val/num_eos_tokens": 3},
                ("collapsed", "collapsed to 1.0 tokens"): {"val/response_length": 1.0},
                ("maximum length", "maximum of 32 tokens"): {"val/min_response_length": 32.0},
                ("KL", "KL to the reference is nan"): {"objective/kl": math.nan},
                ("clip fraction", "clip fraction nan"): {"policy/clipfrac_avg": math.nan}}
    for (check, words), change in troubles.items():
        alerts = health_alerts({**healthy, **change}, config)
        assert list(alerts) == [check] and words in alerts[check], (words, alerts)


def test_ppo_takes_data_parallel_fsdp_and_zero3_and_refuses_zero1_2_and_sharded_lora():
    from accelerate.utils import DistributedType

    from ppo.trainer import unsupported_distribution

    for stage in (None, 1, 2):
        assert "stage 3 only" in unsupported_distribution(DistributedType.DEEPSPEED, zero_stage=stage)
    assert unsupported_distribution(DistributedType.DEEPSPEED, zero_stage=3) is None
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        assert "LoRA" in unsupported_distribution(sharded, use_peft=True, zero_stage=3)
    for taken in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP):
        assert unsupported_distribution(taken) is None
    # fp16's loss scaler is accelerate's, which the sharded optimisers bypass: refused there, taken under DDP
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        assert "fp16" in unsupported_distribution(sharded, zero_stage=3, precision="fp16")
        assert unsupported_distribution(sharded, zero_stage=3, precision="bf16") is None
    assert unsupported_distribution(DistributedType.MULTI_GPU, precision="fp16") is None


def test_offloading_in_the_accelerate_config_is_found_for_ppo_to_refuse(monkeypatch):
    from ppo.trainer import offload_settings

    for name in ("FSDP_OFFLOAD_PARAMS", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    assert offload_settings() == []
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")  # as the shipped configs launch
    assert offload_settings() == []
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    assert offload_settings() == ["fsdp_offload_params", "offload_optimizer_device"]


def test_a_zero3_resume_from_a_checkpoint_without_partitions_is_refused(tmp_path):
    """DeepSpeed would load nothing from it, with a warning, and the run go on from its first weights."""
    from ppo.zero3 import load_partitions
    from rlhf.errors import ConfigError

    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(ConfigError, match="checkpoint-4 was not written under ZeRO-3"):
        load_partitions(tmp_path / "checkpoint-4", engine=None)


def eval_points(scores: list[float], judged: list[float], sem: float = 0.02) -> list[dict]:
    return [{"update": 4 * i, "kl": float(i), "eval/score": score, "eval/judge": judge, "eval/judge_sem": sem}
            for i, (score, judge) in enumerate(zip(scores, judged))]


def test_overoptimisation_alert_fires_when_the_proxy_rises_as_the_gold_falls():
    from ppo.health import overoptimisation_alert

    rising_proxy = [0.0, 0.5, 1.0, 1.5, 2.0]
    alert = overoptimisation_alert(eval_points(rising_proxy, [0.50, 0.60, 0.55, 0.45, 0.40]))
    assert alert and "since update 4" in alert and "0.600 -> 0.400" in alert
    # a steady gold (moves within its noise), a gold still rising, or a proxy that fell too: no alert
    assert overoptimisation_alert(eval_points(rising_proxy, [0.50, 0.52, 0.49, 0.51, 0.50])) is None
    assert overoptimisation_alert(eval_points(rising_proxy, [0.50, 0.55, 0.60, 0.65, 0.70])) is None
    assert overoptimisation_alert(eval_points([0.0, 2.0, 1.5, 1.0, 0.5], [0.50, 0.60, 0.55, 0.45, 0.40])) is None
    # the same fall inside wide standard errors is noise; one point, or no judge, says nothing
    assert overoptimisation_alert(eval_points(rising_proxy, [0.50, 0.60, 0.55, 0.45, 0.40], sem=0.1)) is None
    assert overoptimisation_alert(eval_points([0.0], [0.5])) is None
    assert overoptimisation_alert([{"update": 0, "kl": 0.0, "eval/score": 0.0}] * 3) is None



def simulated_eval_points(rng, points: int, fall: float, prompts: int = 32) -> list[dict]:
    """A rising reward-model score and a judge whose prompts each score their own level plus noise (sd 0.1) at
    every point, all `fall` lower at the last point."""
    levels = [rng.gauss(0.5, 0.2) for _ in range(prompts)]
    made = []
    for i in range(points):
        judged = [level + rng.gauss(0.0, 0.1) - (fall if i == points - 1 else 0.0) for level in levels]
        made.append({"update": 4 * i, "kl": float(i), "eval/score": float(i), "eval/judge": statistics.fmean(judged),
                     "eval/judge_sem": statistics.stdev(judged) / prompts ** 0.5, "judge_scores": judged})
    return made


def test_a_flat_judge_over_many_eval_points_rarely_fires_the_alert_and_a_real_fall_still_does():
    """With 20 eval points a flat judge's best earlier point lies well above the latest by chance: against the best
    point with a bar of 2 standard errors, about a quarter of such runs fired; the bar grows with the points
    compared."""
    from ppo.health import fall_threshold, overoptimisation_alert

    assert fall_threshold(1) == pytest.approx(2.0) and 2.5 < fall_threshold(4) < 2.6 and fall_threshold(19) > 3.0
    rng = random.Random(0)
    flat = [overoptimisation_alert(simulated_eval_points(rng, 20, fall=0.0)) for _ in range(300)]
    assert sum(alert is not None for alert in flat) / 300 < 0.06
    fallen = [overoptimisation_alert(simulated_eval_points(rng, 20, fall=0.15)) for _ in range(100)]
    assert sum(alert is not None for alert in fallen) >= 95
    assert "the bar for 19 earlier points" in next(alert for alert in fallen if alert)
    # one earlier point: the bar is 2 standard errors, as it was (0.06 against a paired error of 0.025)
    assert overoptimisation_alert(eval_points([0.0, 1.0], [0.56, 0.50])) is not None
    assert overoptimisation_alert(eval_points([0.0, 1.0], [0.55, 0.50])) is None

# --- critic-free advantages (issue 18), by hand on small groups ---------------------------------------------------

def test_grpo_advantages_by_hand_with_and_without_the_std_scaling():
    from ppo.core import grpo_advantages

    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 8.0])  # two groups of 4
    # group 1: mean 2.5, Bessel std sqrt(5/3); group 2: mean 2, std sqrt(48/3) = 4
    std = math.sqrt(5 / 3)
    expected = [(-1.5) / (std + 1e-4), (-0.5) / (std + 1e-4), 0.5 / (std + 1e-4), 1.5 / (std + 1e-4),
                -2 / 4.0001, -2 / 4.0001, -2 / 4.0001, 6 / 4.0001]
    assert grpo_advantages(scores, 4).tolist() == pytest.approx(expected, rel=1e-5)
    # Dr. GRPO: centred only
    assert grpo_advantages(scores, 4, "none").tolist() == pytest.approx([-1.5, -0.5, 0.5, 1.5, -2, -2, -2, 6])
    with pytest.raises(ValueError, match="scale must be one of group, none"):
        grpo_advantages(scores, 4, "batch")


def test_an_all_equal_group_has_zero_advantage_and_no_nan_in_every_method():
    from ppo.core import grpo_advantages, reinforce_pp_advantages, rloo_advantages

    equal = torch.tensor([0.7, 0.7, 0.7, 1.0, 1.0, 1.0])  # groups of 3, each all alike
    for advantages in (grpo_advantages(equal, 3), grpo_advantages(equal, 3, "none"), rloo_advantages(equal, 3)):
        assert not advantages.isnan().any() and advantages.abs().max() < 1e-4
    assert grpo_advantages(torch.ones(4), 4).tolist() == [0.0] * 4  # exactly, when the mean is exact
    rewards, mask = torch.zeros(2, 3), torch.ones(2, 3)
    rewards[:, -1] = 0.5  # every response the same return: nothing to prefer
    assert reinforce_pp_advantages(rewards, mask).abs().max() < 1e-4
    assert not reinforce_pp_advantages(rewards, mask).isnan().any()


def test_rloo_baseline_is_the_mean_of_the_other_answers():
    from ppo.core import rloo_advantages

    scores = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 0.0])  # two groups of 3
    # 1 - (2 + 6) / 2 = -3; 2 - (1 + 6) / 2 = -1.5; 6 - 1.5 = 4.5; 3 - 1.5 = 1.5 (twice); 0 - 3 = -3
    assert rloo_advantages(scores, 3).tolist() == pytest.approx([-3.0, -1.5, 4.5, 1.5, 1.5, -3.0])
    assert rloo_advantages(scores, 3).tolist() == pytest.approx(
        (3 / 2 * (scores.view(2, 3) - scores.view(2, 3).mean(-1, keepdim=True))).flatten().tolist())


def test_reinforce_pp_whitens_the_returns_to_go_over_the_whole_batch():
    from ppo.core import per_token, reinforce_pp_advantages

    rewards = torch.tensor([[-0.1, -0.1, 1.0], [-0.2, 2.0, 0.0]])  # KL penalty per token, score at the end
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    returns = [0.8, 0.9, 1.0, 1.8, 2.0]  # to go, over the 5 real tokens
    mean = sum(returns) / 5
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / 4)
    advantages = reinforce_pp_advantages(rewards, mask)
    assert advantages[mask.bool()].tolist() == pytest.approx([(r - mean) / std for r in returns], rel=1e-4)
    assert advantages[1, 2] == 0
    assert per_token(torch.tensor([2.0, -1.0]), mask).tolist() == [[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]]


def test_grpo_kl_loss_is_the_k3_mean_and_pulls_the_policy_towards_the_reference():
    from ppo.core import kl_loss

    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref, mask = torch.tensor([[-1.5, -2.0, -9.0]]), torch.tensor([[1, 1, 0]])
    # k3 at log r = -0.5: e^-0.5 - 1 + 0.5; at 0: 0; the third token is padding
    expected = (math.exp(-0.5) - 0.5) / 2
    loss = kl_loss(logprobs, ref, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dlogp of (e^(ref - logp) - 1 - (ref - logp)) = 1 - e^(ref - logp) > 0 where the policy is above the
    # reference: a step against the gradient lowers that log-prob
    assert logprobs.grad[0, 0].item() == pytest.approx((1 - math.exp(-0.5)) / 2, rel=1e-6)
    assert logprobs.grad[0, 1] == 0 and logprobs.grad[0, 2] == 0
    # a padded position whose log-probs are far apart (the reference's zeroed, the policy's not): exp overflows
    # there, and the loss and its gradient stay finite
    far = torch.tensor([[-1.0, -95.0]], requires_grad=True)
    loss = kl_loss(far, torch.tensor([[-1.5, 0.0]]), torch.tensor([[1, 0]]))
    loss.backward()
    assert loss.item() == pytest.approx(math.exp(-0.5) - 0.5, rel=1e-6) and torch.isfinite(far.grad).all()


def test_each_answer_has_its_own_sampling_seed_within_64_bits():
    from ppo.trainer import row_seed

    seeds = {row_seed(seed, update, row) for seed in (0, 42, 2 ** 32) for update in range(1, 9) for row in range(64)}
    assert len(seeds) == 3 * 8 * 64 and all(0 <= s < 2 ** 63 for s in seeds)
    for s in (row_seed(2 ** 62, 10 ** 6, 10 ** 5), row_seed(42, 3, 7)):
        torch.Generator().manual_seed(s)  # takes it


def test_the_overoptimisation_alert_reads_the_prompts_paired_differences_and_stays_quiet_on_unknowns():
    from ppo.health import overoptimisation_alert

    # 32 prompts of widely different levels, every one 0.12 lower at the last point than at the peak: the points'
    # own standard errors (about 0.055 each) hide the fall, the paired differences do not
    levels = [0.45 * math.sin(3.0 * i) for i in range(32)]
    scores = [[level + 0.5 for level in levels], [level + 0.6 for level in levels], [level + 0.48 for level in levels]]
    points = [{"update": 4 * i, "kl": float(i), "eval/score": float(i), "eval/judge": statistics.fmean(judged),
               "eval/judge_sem": statistics.stdev(judged) / 32 ** 0.5, "judge_scores": judged}
              for i, judged in enumerate(scores)]
    assert 2 * (2 * points[1]["eval/judge_sem"] ** 2) ** 0.5 > 0.12  # unpaired, the fall is inside the noise
    alert = overoptimisation_alert(points)
    assert alert and "since update 4" in alert
    unpaired = [{key: value for key, value in point.items() if key != "judge_scores"} for point in points]
    assert overoptimisation_alert(unpaired) is None
    # one eval prompt: the fall's error is unknown; a reward score or judge that is not a number: nothing
    one_prompt = [dict(point, judge_scores=point["judge_scores"][:1], **{"eval/judge_sem": 0.0}) for point in points]
    assert overoptimisation_alert(one_prompt) is None
    for key in ("eval/score", "eval/judge"):
        assert overoptimisation_alert(points[:2] + [dict(points[2], **{key: float("nan")})]) is None

