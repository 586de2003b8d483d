"""`preferences:` section of a run config: how candidate responses are sampled into the label store, how the
labelling app hands them out, and who votes when `rlhf run` collects the labels (simulated labellers or people)."""
import os
from dataclasses import dataclass, field

from rlhf import hardware
from rlhf.rankings import MAX_K


@dataclass
class PreferencesStageConfig:
    model: str = field(default="", metadata={
        "help": "Model that answers the prompts; empty: this run's SFT output (runs/<name>/sft)."})
    prompts: str = field(default="data/rl_prompts.jsonl", metadata={"help": "Prompts to sample responses for."})
    num_prompts: int = field(default=0, metadata={"help": "Use the first N prompts (0: all)."})
    responses_per_prompt: int = field(default=2, metadata={
        "help": "k responses per prompt; every pair of them becomes a comparison (k choose 2)."})
    feedback: str = field(default="pairwise", metadata={
        "help": "pairwise: each pair of a prompt's answers is a comparison; ranking: its k answers (k at most 6) "
                "are one ranking item, which each labeller orders at once (ties allowed), exported as its k choose "
                "2 pairs weighted as one observation."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest response, in tokens."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (top_k 0, top_p 1)."})
    batch_size: int = field(default=8, metadata={"help": "Answers generated at once (batched by prompt length)."})
    batch: str = field(default="", metadata={"help": "Name of the comparison batch; empty: the run name."})
    db: str = field(default="", metadata={
        "help": "Label store URL; empty: $RLHF_DB_URL, else the run's own store, runs/<name>/labels.db."})
    seed: int = field(default=0, metadata={"help": "Seeds sampling and the random a/b order of each pair."})
    precision: str = field(default="auto", metadata={"help": "auto, fp32, bf16 or fp16 for sampling responses."})
    select: str = field(default="all", metadata={
        "help": "Which candidate pairs become comparisons: all, or uncertain (those the reward model is least sure "
                "about: the ensemble's spread of the reward gap, or with one head the smallest gap)."})
    reward_model: str = field(default="", metadata={
        "help": "With select: uncertain, the reward model folder; empty: this run's (runs/<name>/reward)."})
    select_count: int = field(default=0, metadata={
        "help": "With select: uncertain, how many comparisons to queue (0: half of the candidate pairs)."})
    overlap: int = field(default=3, metadata={
        "help": "Distinct labellers each comparison goes to in the app (gold items go to everyone)."})
    gold_rate: float = field(default=0.1, metadata={
        "help": "Share of a labeller's items drawn from gold comparisons they have not seen yet."})
    guidelines: str = field(default="data/guidelines.md", metadata={
        "help": "Markdown file shown in the app's guidelines panel."})
    assignment_timeout: float = field(default=30.0, metadata={
        "help": "Minutes an item may stay shown without a vote before it goes back to the pool."})
    concurrency: int = field(default=4, metadata={
        "help": "Worker threads of the app (sign-in, admin work, labelling with PostgreSQL; with SQLite labelling "
                "runs on the event loop). Python runs one thread at a time: more mostly add contention."})
    sign_in_free_failures: int = field(default=3, metadata={
        "help": "Failed sign-ins per account name and per client address answered without delay; after them each "
                "attempt waits twice as long as the one before, from sign_in_delay seconds."})
    sign_in_delay: float = field(default=1.0, metadata={"help": "The first sign-in delay, in seconds."})
    sign_in_lockout: int = field(default=10, metadata={
        "help": "Failed sign-ins that lock an account name or client address for sign_in_lockout_minutes."})
    sign_in_lockout_minutes: float = field(default=15.0, metadata={"help": "How long a lockout lasts."})
    session_hours: float = field(default=12.0, metadata={"hashed": False,  # the app's alone: no stage output
        "help": "A signed-in session ends this many hours after its sign-in (a working day by default): the "
                "labeller signs in again."})
    sign_in_workers: int = field(default=1, metadata={
        "help": "Password checks (scrypt) run at once, in threads of their own beside the labelling events."})

    # rlhf run (rlhf preferences): who votes, and what the export keeps
    simulate_judge: str = field(default="", metadata={
        "help": "Simulated labellers vote with this judge (builtin:NAME or module:function); empty: people vote "
                "in the app and the run waits until every comparison has min_votes votes."})
    simulate_labellers: int = field(default=3, metadata={
        "help": "How many simulated labellers vote. They take items from the same queue as people: each comparison "
                "goes to `overlap` of them, gold items are mixed in at `gold_rate`."})
    simulate_temperature: float = field(default=1.0, metadata={
        "help": "Simulated labellers' Bradley-Terry temperature, in judge-score units (0: always the better)."})
    simulate_noise: float = field(default=0.0, metadata={
        "help": "Chance a simulated vote is replaced by a uniformly random one."})
    simulate_skip: float = field(default=0.0, metadata={
        "help": "Chance a simulated labeller skips an item (the queue gives its slot to another labeller)."})
    ai_judge: str = field(default="", metadata={
        "help": "An AI labeller: this chat model (a bundled name or a model folder) votes first, as ai/<model>, by "
                "ai_constitution, taking one of each comparison's `overlap` places (rlhf label ai); empty: none."})
    ai_constitution: str = field(default="data/constitution.md", metadata={
        "help": "With ai_judge: the principles it compares answers by."})
    ai_tie_margin: float = field(default=0.05, metadata={
        "help": "With ai_judge: P(a better), both orders averaged, within this of one half is a tie."})
    gold: str = field(default="", metadata={"help": "Gold comparisons imported into the store first (empty: none)."})
    min_votes: int = field(default=1, metadata={
        "help": "Votes every comparison needs before the export (the human wait), and the export's minimum."})
    poll_seconds: float = field(default=10.0, metadata={"help": "How often the human wait checks the store."})

    # online rounds 2 and later (run.rounds): round 1 is unaffected by these
    round_policy: str = field(default="ppo", metadata={"later_rounds": True, "help": (
        "Online rounds 2 and later: whose answers they compare, the previous round's ppo or dpo policy.")})
    round_prompts: int = field(default=0, metadata={"later_rounds": True, "help": (
        "Online rounds 2 and later: fresh prompts each round samples, the ones after those earlier rounds took "
        "from `prompts` (0: num_prompts).")})
    round_budget: int = field(default=0, metadata={"later_rounds": True, "help": (
        "Online rounds 2 and later: comparisons labelled each round, the candidate pairs the previous round's "
        "reward model is least sure about (0: half of the candidates).")})

    def __post_init__(self):
        self.hardware = hardware.choose(self.precision)
        if self.simulate_labellers < 1 or self.min_votes < 1 or self.poll_seconds <= 0:
            raise ValueError("simulate_labellers and min_votes must be at least 1, poll_seconds above 0")
        from preference_ui.simulate import LabellerModel

        LabellerModel(self.simulate_temperature, 0.0, None, self.simulate_noise, self.simulate_skip)  # checks them
        if self.select not in ("all", "uncertain"):
            raise ValueError(f"select must be all or uncertain, got '{self.select}'")
        if self.responses_per_prompt < 2:
            raise ValueError(f"responses_per_prompt must be at least 2, got {self.responses_per_prompt}")
        if self.feedback not in ("pairwise", "ranking"):
            raise ValueError(f"feedback must be pairwise or ranking, got '{self.feedback}'")
        if self.feedback == "ranking" and (self.responses_per_prompt > MAX_K or self.select != "all"):
            raise ValueError(f"feedback: ranking orders at most {MAX_K} answers (responses_per_prompt "
                             f"{self.responses_per_prompt}) and queues them all (select: all, got {self.select})")
        if self.round_policy not in ("ppo", "dpo"):
            raise ValueError(f"round_policy must be ppo or dpo, got '{self.round_policy}'")
        if self.round_prompts < 0 or self.round_budget < 0 or self.num_prompts < 0 or self.select_count < 0:
            raise ValueError("num_prompts, select_count, round_prompts and round_budget must be 0 or more")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be above 0 for sampling, got {self.temperature}")
        if self.overlap < 1:
            raise ValueError(f"overlap must be at least 1, got {self.overlap}")
        if not 0 <= self.ai_tie_margin < 0.5:
            raise ValueError(f"ai_tie_margin is a gap in probability from one half: 0 to below 0.5, got "
                             f"{self.ai_tie_margin}")
        if not self.simulate_judge and self.min_votes > self.overlap:
            raise ValueError(f"min_votes ({self.min_votes}) is more than overlap ({self.overlap}): the app gives each "
                             "comparison to `overlap` labellers, so with people voting the run would wait forever")
        machine_votes = min(self.overlap, self.simulate_labellers + bool(self.ai_judge))
        if self.simulate_judge and self.min_votes > machine_votes:
            raise ValueError(f"min_votes ({self.min_votes}) is more than the {machine_votes} vote(s) each comparison "
                             f"gets (overlap {self.overlap}, simulate_labellers {self.simulate_labellers}"
                             f"{', and the AI labeller' if self.ai_judge else ''}): nothing would be exported")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be at least 1, got {self.batch_size} and "
                             f"{self.max_new_tokens}")
        if not 0 <= self.gold_rate <= 1:
            raise ValueError(f"gold_rate must be between 0 and 1, got {self.gold_rate}")
        if self.assignment_timeout <= 0 or self.concurrency < 1:
            raise ValueError("assignment_timeout must be above 0 and concurrency at least 1")
        if (self.sign_in_free_failures < 0 or self.sign_in_delay < 0 or self.sign_in_lockout < 1
                or self.sign_in_lockout_minutes <= 0 or self.sign_in_workers < 1 or self.session_hours <= 0):
            raise ValueError("sign_in_free_failures and sign_in_delay must be at least 0, sign_in_lockout and "
                             "sign_in_workers at least 1, sign_in_lockout_minutes and session_hours above 0")

    @property
    def process_index(self) -> int:
        return int(os.environ.get("RANK", 0))
