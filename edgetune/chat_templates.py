"""The chat templates (tokenizer.chat_template, jinja2) the released models of each architecture ship.

`edgetune synth` writes them into synthetic GGUFs so `--chat` is exercised per architecture;
a real GGUF carries its own, which is what train/chat.py renders.  Each is the published template
reduced to plain system/user/assistant turns (no tools; Qwen3 with thinking enabled, i.e. no
injected empty <think> block); tests/test_archs.py checks edgetune's rendering against llama.cpp's
llama_chat_apply_template on the same messages.
"""

CHAT_TEMPLATES = {
    # Gemma 3: no system role — a system message is folded into the first user turn.
    "gemma3": (
        "{{ bos_token }}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
        "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
        "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"),
    # Qwen3 (and Qwen2): ChatML.
    "qwen3": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"),
    # Llama 3.x instruct.
    "llama3": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
        "message['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{%- endif %}"),
    # Phi-3 family.
    "phi3": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' + '\n' }}{% endif %}"),
}
