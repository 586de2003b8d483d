"""The stages of the pipeline, in order: the one list the `rlhf` command and `rlhf run` read. Each stage is
declared in its own module (rlhf.stage.Stage); its name is its command, config section, run folder and manifest
entry."""
from evaluation.evaluate import EVAL_STAGE
from ppo.dpo import DPO_STAGE
from ppo.trainer import PPO_STAGE
from preference_ui.collect import PREFERENCES_STAGE
from reward.train import REWARD_STAGE
from rlhf.config import RunConfig
from sft.train import SFT_STAGE

STAGES = (SFT_STAGE, PREFERENCES_STAGE, REWARD_STAGE, PPO_STAGE, DPO_STAGE, EVAL_STAGE)
BY_NAME = {stage.name: stage for stage in STAGES}
# a run config's sections: `run:` and one per stage
SECTIONS = {"run": RunConfig, **{stage.name: stage.config_class for stage in STAGES}}
