"""The protocol settings object and the backends' engine settings (quick tier)."""

from __future__ import annotations

import pytest

from rank1_local import LlamaSettings, ScoringConfig
from rank1_local.core.config import split_settings
from rank1_local.core.errors import Rank1Error

pytestmark = pytest.mark.quick


@pytest.mark.parametrize("kwargs, message", [
    ({"max_think_tokens": 0}, "max_think_tokens must be between 1 and 32768"),
    ({"max_think_tokens": 40000, "n_ctx": 50000}, "max_think_tokens must be between"),
    ({"max_think_tokens": 8192, "n_ctx": 4096}, r"n_ctx \(4096\) leaves no room .* 8192"),
    ({"rethink_rounds": -1}, "rethink_rounds must be 0 or more"),
    ({"prompt_template": "no placeholder"}, "prompt_template must contain 'FILL_QUERY_HERE'"),
    ({"max_think_tokens": "64"}, "max_think_tokens must be an integer"),
    ({"n_ctx": True}, "n_ctx must be an integer"),
    ({"protocol": "vllm"}, "protocol must be one of official, full"),
    ({"truncate_passages": "yes"}, "truncate_passages must be true or false"),
])
def test_bad_settings_name_the_setting(kwargs, message):
    with pytest.raises(Rank1Error, match=message):
        ScoringConfig(**kwargs)


def test_config_is_a_plain_record():
    config = ScoringConfig(max_think_tokens=64, n_ctx=512, prompt_template="Claim: FILL_QUERY_HERE")
    assert config.to_dict() == {"max_think_tokens": 64, "n_ctx": 512, "prompt_template": "Claim: FILL_QUERY_HERE",
                                "rethink_rounds": 0, "protocol": "official", "truncate_passages": False}
    assert ScoringConfig(**config.to_dict()) == config
    with pytest.raises(AttributeError):
        config.n_ctx = 1024  # frozen


@pytest.mark.parametrize("kwargs, message", [
    ({"parallel": 0}, "parallel must be at least 1"),
    ({"threads": 0}, "threads must be at least 1"),
    ({"n_gpu_layers": -2}, "n_gpu_layers must be"),
])
def test_llama_settings_are_validated(kwargs, message):
    with pytest.raises(Rank1Error, match=message):
        LlamaSettings(**kwargs)


def test_keyword_arguments_fill_config_and_settings():
    config, settings = split_settings("Rank1", None, None, LlamaSettings, {"max_think_tokens": 64, "parallel": 8})
    assert config == ScoringConfig(max_think_tokens=64) and settings == LlamaSettings(parallel=8)
    with pytest.raises(TypeError, match="unexpected keyword argument.*nonsense"):
        split_settings("Rank1", None, None, LlamaSettings, {"nonsense": 1})
    with pytest.raises(TypeError, match="either config= or max_think_tokens"):
        split_settings("Rank1", ScoringConfig(), None, LlamaSettings, {"max_think_tokens": 64})
