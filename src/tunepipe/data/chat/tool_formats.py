"""Tool definitions and function calls as text, for the named templates (`data.tool_format`).

Each format is two functions: `tools(list, today) -> str` (appended to the system prompt; only
llama3 writes `today`, the date from `data.template_date`) and `calls(list of (name, arguments
JSON text)) -> str` (the assistant's function-call turn).
The wording is LLaMA-Factory 0.9.5's for the same format name (default, qwen, llama3,
mistral, glm4, qwen3_5), so a tool-calling dataset tokenizes the same; the code is tunepipe's.
"""

from __future__ import annotations

import json
import re
from datetime import date

from tunepipe.errors import TunepipeError

DEFAULT_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n```\n')
QWEN_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>')
LLAMA3_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    'Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. '
    "Do not use variables.\n\n{tool_text}")
# Qwen3.5 lists the tools as JSON but has calls written as <function=...> / <parameter=...> blocks
QWEN3_5_PROMPT = (
    "\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>{tool_text}"
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: "
    "an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language "
    "BEFORE the function call, but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\n</IMPORTANT>")
GLM4_PROMPT = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
               "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}")
GLM4_TOOL = "\n\n## {name}\n\n{body}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


def _function(tool: dict) -> dict:
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _wrapped(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def default_tools(tools: list[dict], today: date) -> str:
    text, names = "", []
    for tool in map(_function, tools):
        params = ""
        for name, param in tool["parameters"]["properties"].items():
            required = ", required" if name in tool["parameters"].get("required", []) else ""
            enum = ", should be one of [{}]".format(", ".join(param["enum"])) if param.get("enum") else ""
            items = ", where each item should be {}".format(param["items"].get("type", "")) if param.get("items") else ""
            params += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
        text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{params}\n"
        names.append(tool["name"])
    return DEFAULT_PROMPT.format(tool_text=text, tool_names=", ".join(names))


def default_calls(calls: list[tuple[str, str]]) -> str:
    return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in calls)


def qwen_tools(tools: list[dict], today: date) -> str:
    return QWEN_PROMPT.format(tool_text="".join("\n" + _dumps(_wrapped(tool)) for tool in tools))


def qwen_calls(calls: list[tuple[str, str]]) -> str:
    return "\n".join(f"<tool_call>\n{_dumps({'name': name, 'arguments': json.loads(arguments)})}\n</tool_call>"
                     for name, arguments in calls)


def llama3_tools(tools: list[dict], today: date) -> str:
    # LLaMA-Factory writes the clock's date here, so its tool rows tokenize differently every day;
    # tunepipe writes data.template_date, a declared input (see the migration notes).
    text = "".join(json.dumps(_wrapped(tool), indent=4, ensure_ascii=False) + "\n\n" for tool in tools)
    return LLAMA3_PROMPT.format(date=today.strftime("%d %b %Y"), tool_text=text)


def llama3_calls(calls: list[tuple[str, str]]) -> str:
    objects = [{"name": name, "parameters": json.loads(arguments)} for name, arguments in calls]
    return _dumps(objects[0] if len(objects) == 1 else objects)


def mistral_tools(tools: list[dict], today: date) -> str:
    return "[AVAILABLE_TOOLS] " + _dumps([_wrapped(tool) for tool in tools]) + "[/AVAILABLE_TOOLS]"


def mistral_calls(calls: list[tuple[str, str]]) -> str:
    return _dumps([{"name": name, "arguments": json.loads(arguments)} for name, arguments in calls])


def glm4_tools(tools: list[dict], today: date) -> str:
    text = "".join(GLM4_TOOL.format(name=tool["name"], body=json.dumps(tool, indent=4, ensure_ascii=False))
                   for tool in map(_function, tools))
    return GLM4_PROMPT.format(tool_text=text)


def glm4_calls(calls: list[tuple[str, str]]) -> str:
    if len(calls) > 1:
        raise TunepipeError("tool format glm4 has no parallel function calls (one call per turn)")
    return f"{calls[0][0]}\n{calls[0][1]}"


def qwen3_5_tools(tools: list[dict], today: date) -> str:
    unwrapped = (tool.get("function", tool) if tool.get("type") == "function" else tool for tool in tools)
    return QWEN3_5_PROMPT.format(tool_text="".join("\n" + _dumps(tool) for tool in unwrapped))


def qwen3_5_calls(calls: list[tuple[str, str]]) -> str:
    """Each call a <function=name> block, one <parameter=key> per argument (strings as they are, other values JSON)."""
    blocks = []
    for name, arguments in calls:
        params = "".join(f"\n<parameter={key}>\n{value if isinstance(value, str) else _dumps(value)}\n</parameter>"
                         for key, value in json.loads(arguments).items())
        blocks.append(f"<tool_call>\n<function={name}>{params}\n</function>\n</tool_call>")
    return "\n".join(blocks)


FORMATS = {
    "default": (default_tools, default_calls),
    "qwen": (qwen_tools, qwen_calls),
    "llama3": (llama3_tools, llama3_calls),
    "mistral": (mistral_tools, mistral_calls),
    "glm4": (glm4_tools, glm4_calls),
    "qwen3_5": (qwen3_5_tools, qwen3_5_calls),
}


def tools_text(tool_format: str, tools_json: str, today: date) -> str:
    """The row's `tools` JSON as the text appended to the system prompt ("" for an empty list)."""
    tools = json.loads(tools_json)
    return FORMATS[tool_format][0](tools, today) if len(tools) else ""


def calls_text(tool_format: str, content: str, thought: tuple[str, str]) -> str:
    """A function_call turn (JSON: one call or a list) as the format writes it. Text around the
    JSON is kept in front of it: whatever surrounds a <tool_call>...</tool_call> block, or a
    leading thought block."""
    match = re.search(r"<tool_call>(.*?)</tool_call>", content, re.DOTALL)
    if match:
        before, payload = content.replace(match.group(0), ""), match.group(1)
    else:
        match = re.search(re.escape(thought[0]) + "(.*?)" + re.escape(thought[1]), content, re.DOTALL)
        before = match.group(0) if match else ""
        payload = content.replace(match.group(0), "") if match else content
    try:
        calls = json.loads(payload)
    except json.JSONDecodeError:
        raise TunepipeError(f"a function_call turn is not JSON: {content[:80]!r}") from None
    calls = calls if isinstance(calls, list) else [calls]
    return before + FORMATS[tool_format][1]([(call["name"], _dumps(call["arguments"])) for call in calls])
