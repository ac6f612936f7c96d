"""modules.sd_schedulers (A1111 1.9+): the schedulers a sampler's name may end with ("DPM++ 2M Karras"), as
names, labels and aliases. The fake's sampling ignores the scheduler."""

from dataclasses import dataclass


@dataclass
class Scheduler:
    name: str
    label: str
    aliases: list = None


schedulers = [Scheduler("automatic", "Automatic"), Scheduler("karras", "Karras"),
              Scheduler("sgm_uniform", "SGM Uniform", aliases=["SGMUniform"])]
schedulers_map = {**{x.name: x for x in schedulers}, **{x.label: x for x in schedulers}}
