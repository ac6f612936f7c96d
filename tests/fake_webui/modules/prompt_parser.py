"""Stand-in for `modules.prompt_parser.SdConditioning`: a list of prompts that also knows the picture size and
whether it is the negative side (SDXL's conditioning reads them); unset fields come from `copy_from`."""


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        source = prompts if copy_from is None else copy_from
        self.is_negative_prompt = bool(is_negative_prompt or getattr(source, "is_negative_prompt", False))
        self.width = width or getattr(source, "width", None)
        self.height = height or getattr(source, "height", None)
