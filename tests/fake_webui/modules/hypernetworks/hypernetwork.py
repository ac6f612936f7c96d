"""modules.hypernetworks.hypernetwork: the hypernetwork list and the plain attention forward."""

import glob
import os

import ldm.modules.attention

attention_CrossAttention_forward = ldm.modules.attention.CrossAttention.forward


def list_hypernetworks(path):
    res = {}
    for filename in sorted(glob.iglob(os.path.join(path or "", "**/*.pt"), recursive=True)):
        res[os.path.splitext(os.path.basename(filename))[0]] = filename
    return res
