"""Plain TRL trainers, as a user would call them, timed: the yardsticks our stage benchmarks compare against.

    python bench/trl_baselines.py sft    --model DIR [--steps 6] [--batch 4] [--seq 128] [--bf16]
    python bench/trl_baselines.py reward --model DIR [--steps 6] [--batch 4] [--seq 128]
    python bench/trl_baselines.py rloo   --model DIR --reward_model DIR [--steps 6] [--batch 4] [--generations 2]
                                         [--completion_length 32]
    python bench/trl_baselines.py grpo   --model DIR --reward_model DIR [--steps 6] [--batch 4] [--generations 2]
                                         [--completion_length 32] [--beta 0.0]

Each trains on made-up text (`words`: our own word list, a seeded generator) with TRL's own defaults except where
an option says otherwise, on the CPU, saving nothing. The last line printed is JSON: `median_step_s` (seconds per
optimiser step, the first, warm-up, step left out) and for SFT `tokens_per_s` (padded tokens per second).
"""
import argparse
import json
import os
import random
import statistics
import tempfile
import time

os.environ.setdefault("WANDB_MODE", "disabled")

WORDS = ("river stone garden window morning candle letter bridge forest market winter summer harbour lantern "
         "meadow pencil kettle blanket village mountain island thunder orchard ladder mirror compass feather "
         "ribbon pocket saddle basket teacher painter farmer sailor baker doctor singer walker reader builder "
         "quiet bright gentle heavy narrow golden silver hollow crooked rapid patient careful eager humble "
         "swift steady clever honest brave simple ancient modern distant nearby green purple orange yellow "
         "carry follow gather listen wander borrow explain imagine measure notice promise remember travel "
         "whisper build climb cook dance draw drive fold grow jump knock laugh paint plant pour read ride "
         "sing sleep swim throw visit wash write because although before after during while under above "
         "between beside beyond across toward around often seldom always never rarely early later today "
         "tomorrow yesterday bread cheese apple pepper honey butter soup salad coffee tea clock chair table "
         "door floor roof wall street station ticket engine wheel signal button paper story song poem "
         "question answer reason result number pattern shadow circle square corner edge surface").split()


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def step_timer():
    from transformers import TrainerCallback

    class StepSeconds(TrainerCallback):
        def __init__(self):
            self.seconds = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

        def median(self) -> float:
            return statistics.median(self.seconds[1:] or self.seconds)

    return StepSeconds()


def common_args(a, out: str, bf16: bool = False) -> dict:
    return {"output_dir": out, "max_steps": a.steps, "per_device_train_batch_size": a.batch, "bf16": bf16,
            "use_cpu": True, "report_to": "none", "save_strategy": "no", "logging_steps": 1000,
            "disable_tqdm": True}


def sft(a) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rng = random.Random(0)
    rows = [{"prompt": [{"role": "user", "content": words(rng, 20)}],
             "completion": [{"role": "assistant", "content": words(rng, a.seq)}]} for _ in range(a.steps * a.batch)]
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(**common_args(a, out, a.bf16), max_length=a.seq)
        SFTTrainer(model=a.model, args=config, train_dataset=Dataset.from_list(rows), callbacks=[timer]).train()
    return {"median_step_s": timer.median(), "tokens_per_s": a.batch * a.seq / timer.median()}


def reward(a) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rng = random.Random(0)
    rows = [{"prompt": [{"role": "user", "content": words(rng, 20)}],
             "chosen": [{"role": "assistant", "content": words(rng, a.seq // 3)}],
             "rejected": [{"role": "assistant", "content": words(rng, a.seq // 3)}]} for _ in range(16 * a.batch)]
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(**common_args(a, out, a.bf16), max_length=a.seq)
        RewardTrainer(model=a.model, args=config, train_dataset=Dataset.from_list(rows), callbacks=[timer]).train()
    return {"median_step_s": timer.median()}


def rloo(a) -> dict:
    from trl import RLOOConfig, RLOOTrainer

    return online_rl(a, RLOOConfig, RLOOTrainer)


def grpo(a) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    return online_rl(a, GRPOConfig, GRPOTrainer, beta=a.beta)


def online_rl(a, config_class, trainer_class, **settings) -> dict:
    """TRL's RLOO or GRPO trainer against a one-output reward model on "Write about ..." prompts."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rng = random.Random(0)
    rows = [{"prompt": [{"role": "user", "content": "Write about " + words(rng, 8)}]} for _ in range(64 * a.batch)]
    reward_model = AutoModelForSequenceClassification.from_pretrained(a.reward_model, num_labels=1)
    reward_tokenizer = AutoTokenizer.from_pretrained(a.reward_model)
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out:
        config = config_class(**common_args(a, out, a.bf16), num_generations=a.generations,
                              max_completion_length=a.completion_length, temperature=0.7, **settings)
        trainer_class(model=a.model, reward_funcs=reward_model, reward_processing_classes=reward_tokenizer,
                      args=config, train_dataset=Dataset.from_list(rows), callbacks=[timer]).train()
    return {"median_step_s": timer.median()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trainer", choices=("sft", "reward", "rloo", "grpo"))
    p.add_argument("--model", required=True, help="a model folder")
    p.add_argument("--reward_model", help="rloo, grpo: a one-output sequence-classification model folder")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4, help="rows per step (rloo, grpo: completions per step)")
    p.add_argument("--seq", type=int, default=128, help="sft, reward: tokens per row, about")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (TRL's own default; the callers pass it "
                   "when our stage trains in bf16 on this machine, so both sides run at one precision)")
    p.add_argument("--generations", type=int, default=2, help="rloo, grpo: completions per prompt")
    p.add_argument("--completion_length", type=int, default=32, help="rloo, grpo: longest completion")
    p.add_argument("--beta", type=float, default=0.0, help="grpo: KL coefficient (TRL's default 0: no reference)")
    a = p.parse_args()
    print(json.dumps({"sft": sft, "reward": reward, "rloo": rloo, "grpo": grpo}[a.trainer](a)))


if __name__ == "__main__":
    main()
