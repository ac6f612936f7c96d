"""Re-implementations of what A1111 v1.10.1 does with embedding and hypernetwork files, for the tests.

Written from A1111's code (modules/safe.py, textual_inversion/textual_inversion.py, hypernetworks/hypernetwork.py,
v1.10.1) independently of lib_sdtrain, so that the tests compare our files against A1111's rules, not against
our own reading of them.
"""

import collections
import inspect
import pickle
import re
import zipfile

import torch

# modules/safe.py (v1.10.1): the zip member check and the restricted unpickler's allow-list
A1111_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
A1111_ZIP_NAMES_BEFORE_1_7 = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")
ALLOWED = {
    ("collections", "OrderedDict"),
    *(("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")),
    *(("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                             "ByteStorage", "float32", "BFloat16Storage")),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"), ("__builtin__", "set"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """A1111's RestrictedUnpickler: storages become dummies, only the allow-listed globals resolve."""

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            if module == "collections":
                return collections.OrderedDict
            obj = __import__(module, fromlist=[name])
            return getattr(obj, name)
        raise Exception(f"global '{module}/{name}' is forbidden")


def a1111_check_pt(path, names_re=A1111_ZIP_NAMES):
    """modules/safe.py `check_pt`: raises on a refused file (A1111 then logs and loads nothing)."""
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if not names_re.match(name):
                raise Exception(f"bad file inside {path}: {name}")
        pkl = [n for n in z.namelist() if DATA_PKL.match(n)]
        if len(pkl) != 1:
            raise Exception(f"{len(pkl)} data.pkl in {path}")
        with z.open(pkl[0]) as fh:
            RestrictedUnpickler(fh).load()


def a1111_load(path):
    """A1111's `safe.load`: the check, then torch.load (weights_only as a stricter stand-in for the unsafe one)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    a1111_check_pt(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- textual inversion -------------------------------------------------------------------------------
def a1111_embedding_vectors(data):
    """`create_embedding_from_data`: {"vec": tensor or {"clip_l", "clip_g"}, "vectors": n, "shape": width}."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        vec = next(iter(params.values())).detach().float()
        return {"vec": vec, "vectors": vec.shape[0], "shape": vec.shape[-1]}
    if type(data) is dict and "clip_g" in data and "clip_l" in data:
        vec = {k: v.detach().float() for k, v in data.items()}
        return {"vec": vec, "vectors": data["clip_g"].shape[0],
                "shape": data["clip_g"].shape[-1] + data["clip_l"].shape[-1]}
    assert type(data) is dict and type(next(iter(data.values()))) is torch.Tensor
    assert len(data) == 1, "embedding file has multiple terms in it"
    emb = next(iter(data.values()))
    emb = emb.unsqueeze(0) if emb.dim() == 1 else emb
    return {"vec": emb.detach().float(), "vectors": emb.shape[0], "shape": emb.shape[-1]}


# ---- hypernetworks ----------------------------------------------------------------------------------
ACTIVATIONS = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU,
               "elu": torch.nn.ELU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
# HypernetworkModule.activation_dict: plus every class of torch.nn.modules.activation by lower-cased name
ACTIVATIONS.update({name.lower(): cls for name, cls in inspect.getmembers(torch.nn.modules.activation)
                    if inspect.isclass(cls) and cls.__module__ == "torch.nn.modules.activation"})


class A1111HypernetworkModule(torch.nn.Module):
    """HypernetworkModule as A1111 builds it when loading a file (state dict given)."""

    def __init__(self, dim, state_dict, layer_structure, activation_func, add_layer_norm, activate_output,
                 dropout_structure):
        super().__init__()
        if layer_structure[0] != 1 or layer_structure[-1] != 1:
            raise ValueError(f"layer structure {layer_structure} must start and end with 1")
        self.multiplier = 1.0
        widths = [int(dim * f) for f in layer_structure]
        steps = len(widths) - 1
        parts = []
        for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
            parts.append(torch.nn.Linear(fan_in, fan_out))
            activated = activation_func not in (None, "linear") and (activate_output or i < steps - 1)
            if activated:
                parts.append(ACTIVATIONS[activation_func]())
            if add_layer_norm:
                parts.append(torch.nn.LayerNorm(fan_out))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                parts.append(torch.nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = torch.nn.Sequential(*parts)
        self.load_state_dict(state_dict)

    def forward(self, x):
        return x + self.linear(x) * (self.multiplier if not self.training else 1)


def a1111_hypernetwork_layers(data, multiplier=1.0):
    """`Hypernetwork.load`: {width: (k module, v module)} in eval mode with the multiplier set."""
    layer_structure = data.get("layer_structure", [1, 2, 1])
    dropout_structure = data.get("dropout_structure", None)
    layers = {}
    for size, sd in data.items():
        if type(size) is int:
            pair = tuple(A1111HypernetworkModule(size, s, layer_structure, data.get("activation_func"),
                                                 data.get("is_layer_norm", False), data.get("activate_output", True),
                                                 dropout_structure) for s in sd)
            for m in pair:
                m.eval()
                m.multiplier = multiplier
            layers[size] = pair
    return layers


def apply_hypernetwork_hooks(unet, layers):
    """`apply_single_hypernetwork` in every attention: to_k/to_v inputs go through the k/v module of their
    width (context.shape[2]); returns the hook handles."""
    handles = []
    for name, module in unet.named_modules():
        if name.rsplit(".", 1)[-1] not in ("attn1", "attn2"):
            continue
        for child, index in (("to_k", 0), ("to_v", 1)):
            def hook(_module, args, index=index):
                pair = layers.get(args[0].shape[2])
                return None if pair is None else (pair[index](args[0]),) + tuple(args[1:])
            handles.append(getattr(module, child).register_forward_pre_hook(hook))
    return handles


# ---- structure descriptions in the golden JSON's terms ---------------------------------------------
def describe(obj):
    """The golden `.json` description of an unpickled object (type names, tensor shape/dtype/requires_grad)."""
    if isinstance(obj, torch.Tensor):
        return {"type": "torch.Tensor", "shape": list(obj.shape), "dtype": str(obj.dtype),
                "requires_grad": obj.requires_grad}
    if isinstance(obj, dict):
        name = "dict" if type(obj) is dict else f"{type(obj).__module__}.{type(obj).__qualname__}"
        return {"type": name, "items": {(f"<int {k}>" if type(k) is int else k): describe(v) for k, v in obj.items()},
                "key_types": sorted({type(k).__name__ for k in obj})}
    if isinstance(obj, (list, tuple)):
        return {"type": type(obj).__name__, "len": len(obj), "items": [describe(v) for v in obj]}
    return {"type": type(obj).__name__, "value": obj}


def skeleton(desc):
    """A description without values and sizes: types, keys, dtypes, requires_grad, tensor ranks."""
    if desc["type"] == "torch.Tensor":
        return ("tensor", desc["dtype"], desc["requires_grad"], len(desc["shape"]))
    if "items" in desc and isinstance(desc["items"], dict):
        return (desc["type"], tuple((k, skeleton(v)) for k, v in desc["items"].items()))
    if "items" in desc:
        return (desc["type"], tuple(skeleton(v) for v in desc["items"]))
    return desc["type"]
