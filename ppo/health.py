"""Health checks on each PPO update's metrics: the signs that a run is going wrong (docs/ppo.md lists the
checks), each as one readable line named by its check. The trainer logs every update's count, prints each check's
first alert (and how often each fired, at the end), and stops on the first with `--ppo.stop_on_alert`."""
import math
import statistics
from statistics import NormalDist

RATIO_BOUNDS = (0.8, 1.25)    # mean policy ratio outside this: the policy moved too far within one update
CLIPFRAC_LIMIT = 0.3          # more clipped tokens than this: the learning rate or the epochs are too high


def health_alerts(metrics: dict, config) -> dict[str, str]:
    """{check: alert} for one update's metrics (TRL's names), given the stage config's bounds."""
    alerts = {}
    kl = metrics["objective/kl"]
    if not kl <= config.kl_alert:  # a KL that is not a number fires too
        alerts["KL"] = (f"KL to the reference is {kl:.2f} nats per response, past the bound {config.kl_alert:g} "
                        "(kl_alert): raise kl_coef or lower the learning rate")
    ratio = metrics["val/ratio"]
    if not RATIO_BOUNDS[0] <= ratio <= RATIO_BOUNDS[1]:
        alerts["policy ratio"] = (f"mean policy ratio {ratio:.3f} is outside [{RATIO_BOUNDS[0]}, {RATIO_BOUNDS[1]}]: "
                                  "the policy moves too far per update; lower the learning rate or num_ppo_epochs")
    clipfrac = metrics["policy/clipfrac_avg"]
    if not clipfrac <= CLIPFRAC_LIMIT:
        alerts["clip fraction"] = (f"clip fraction {clipfrac:.2f} is above {CLIPFRAC_LIMIT}: lower the learning "
                                   "rate or num_ppo_epochs")
    ended = metrics["val/num_eos_tokens"] / metrics["episodes_per_update"]
    if ended < 0.5:
        alerts["stop token"] = (f"only {ended:.0%} of responses emit the stop token within {config.response_length} "
                                "tokens: raise response_length or missing_eos_penalty")
    length = metrics["val/response_length"]
    if length <= 1.0:
        alerts["collapsed"] = f"responses collapsed to {length:.1f} tokens: the policy learned to stop at once"
    elif metrics["val/min_response_length"] >= config.response_length:
        alerts["maximum length"] = f"every response runs to the maximum of {config.response_length} tokens"
    return alerts


def overoptimisation_alert(points: list[dict]) -> str | None:
    """Over-optimisation (Gao et al. 2022): at the latest eval point the reward model scores the held-out answers
    higher than where the judge peaked, while the judge has fallen from that peak by more than `fall_threshold`
    standard errors of the fall (2 with one earlier point, more with more: the peak is the best of them). `points`
    are the eval points in order, each with eval/score, eval/judge, eval/judge_sem (the judge's standard error over
    the prompts) and judge_scores (each prompt's). Every point answers the same prompts, so the fall's error comes
    from the prompts' paired differences, where a prompt's own level cancels; with one prompt it is unknown, and
    nothing is raised. A score that is not a number raises nothing either."""
    judged = [point for point in points if "eval/judge" in point]
    if len(judged) < 2 or not numbers(judged[-1]):
        return None
    latest, earlier = judged[-1], [point for point in judged[:-1] if numbers(point)]
    if not earlier:
        return None
    peak = max(earlier, key=lambda point: point["eval/judge"])
    threshold = fall_threshold(len(earlier))
    error, drop = fall_error(peak, latest), peak["eval/judge"] - latest["eval/judge"]
    if latest["eval/score"] <= peak["eval/score"] or error is None or drop <= threshold * error:
        return None
    return (f"over-optimisation: since update {peak['update']} the reward model's eval score rose "
            f"{peak['eval/score']:.3f} -> {latest['eval/score']:.3f} while the judge fell {peak['eval/judge']:.3f} -> "
            f"{latest['eval/judge']:.3f} (by more than {threshold:.1f} standard errors, the bar for "
            f"{len(earlier)} earlier point{'s' if len(earlier) > 1 else ''}): the policy is exploiting the reward "
            "model; raise kl_coef, stop earlier, or give the reward model more labels")


def numbers(point: dict) -> bool:
    return math.isfinite(point["eval/judge"]) and math.isfinite(point["eval/score"])


def fall_threshold(compared: int) -> float:
    """How many standard errors a fall must exceed when the latest point is compared with `compared` earlier ones:
    2 for one (a one-sided 2.3% false alarm), raised (Bonferroni) so that a flat judge over many eval points, whose
    best point is always some way above the latest by chance, fires about as rarely as one comparison would (a union
    bound over the comparisons the peak was picked from)."""
    return NormalDist().inv_cdf(1 - NormalDist().cdf(-2.0) / compared)


def fall_error(peak: dict, latest: dict) -> float | None:
    """The standard error of the judge's fall between two eval points: over the prompts' paired differences where
    both points hold each prompt's score (None for one prompt), else from the points' own standard errors (eval
    points of runs saved before the scores were kept)."""
    before, after = peak.get("judge_scores"), latest.get("judge_scores")
    if before is not None and after is not None and len(before) == len(after):
        if len(before) < 2:
            return None
        return statistics.stdev(b - a for b, a in zip(before, after)) / len(before) ** 0.5
    return (peak["eval/judge_sem"] ** 2 + latest["eval/judge_sem"] ** 2) ** 0.5
