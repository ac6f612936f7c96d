"""Stand-in for `modules.shared_total_tqdm.TotalTQDM`: the console's "Total progress" bar (`shared.total_tqdm`).

As A1111 behaves: the bar is made on its first `update()` with a total of `state.job_count × state.sampling_steps`
(the sampler's step callback updates it once per sampling step) and stays until `clear()`, which closes it and
forgets it, so the next update starts a new bar. Generations from the UI clear it when they end; anything that
leaves it standing makes the next generation continue the old count and total. No tqdm here: `bar` is
{"n": steps counted, "total": the total it was made with} or None, `cleared` counts clear() calls.
"""


class TotalTQDM:
    def __init__(self):
        self.bar = None
        self.cleared = 0

    def reset(self):
        from modules import shared

        self.bar = {"n": 0, "total": shared.state.job_count * shared.state.sampling_steps}

    def update(self):
        if self.bar is None:
            self.reset()
        self.bar["n"] += 1

    def updateTotal(self, new_total):   # A1111's name
        if self.bar is None:
            self.reset()
        self.bar["total"] = new_total

    def clear(self):
        if self.bar is not None:
            self.bar = None
        self.cleared += 1
