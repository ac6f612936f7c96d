"""modules.sd_samplers: names and aliases (the fake samples every name with one Euler loop)."""

all_samplers_names = ["DPM++ 2M", "Euler a", "Euler", "DDIM"]
samplers_map = {}
for _name, _aliases in (("DPM++ 2M", ["k_dpmpp_2m"]), ("Euler a", ["k_euler_a", "euler_a"]), ("Euler", ["k_euler"]),
                        ("DDIM", [])):
    samplers_map[_name.lower()] = _name
    for _alias in _aliases:
        samplers_map[_alias.lower()] = _name


def visible_sampler_names():
    """The samplers txt2img lists: A1111 leaves out the ones its settings hide; the fake hides none."""
    return list(all_samplers_names)
