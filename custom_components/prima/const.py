"""Constants of the Prima Home Cluster integration: keys, defaults and limits in one place."""

from __future__ import annotations

import logging
from typing import Final

DOMAIN: Final = "prima"
LOGGER = logging.getLogger(__package__)

# config entry data
CONF_URL: Final = "url"
CONF_API_KEY: Final = "api_key"

# subentry options (conversation and ai_task_data)
CONF_PROMPT: Final = "prompt"
CONF_LLM_HASS_API: Final = "llm_hass_api"
CONF_TEMPERATURE: Final = "temperature"
CONF_TOP_P: Final = "top_p"
CONF_MAX_TOKENS: Final = "max_tokens"
CONF_MAX_HISTORY: Final = "max_history"
CONF_THINK: Final = "think"

DEFAULT_CONVERSATION_NAME: Final = "Prima conversation"
DEFAULT_AI_TASK_NAME: Final = "Prima AI Task"
DEFAULT_TEMPERATURE: Final = 0.6
DEFAULT_TOP_P: Final = 0.95
DEFAULT_MAX_TOKENS: Final = 512
DEFAULT_MAX_HISTORY: Final = 10  # earlier user turns kept besides the current one
DEFAULT_THINK: Final = False

#: tool rounds per answer before the integration gives up (Home Assistant's LLM integrations
#: use the same bound)
MAX_TOOL_ITERATIONS: Final = 10
#: seconds between status polls while the head's event stream is down (it pushes otherwise)
POLL_INTERVAL_S: Final = 30
#: seconds to wait for the head when setting up or testing a connection
CONNECT_TIMEOUT_S: Final = 10
#: seconds a generation may take before the integration gives up on it
GENERATE_TIMEOUT_S: Final = 300
#: a node gone for this long gets a repair issue; its device is removed after STALE_NODE_S
NODE_OFFLINE_ISSUE_S: Final = 15 * 60
STALE_NODE_S: Final = 7 * 24 * 3600
#: the head's status document versions this integration understands
SUPPORTED_API_VERSIONS: Final = frozenset({1})
