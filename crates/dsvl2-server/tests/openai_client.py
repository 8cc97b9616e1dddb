"""Drives a running `dsvl2 serve` with the official openai package.

Usage: python3 openai_client.py BASE_URL IMAGE  (BASE_URL ends in /v1)
"""

import base64
import sys

import openai


def main() -> None:
    base_url, image_path = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    with open(image_path, "rb") as f:
        data_uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri}},
                {"type": "text", "text": "Describe each stage of this image in detail."},
            ],
        }
    ]
    models = client.models.list()
    model = models.data[0].id

    answer = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12, seed=1)
    text = answer.choices[0].message.content
    assert isinstance(text, str) and text, answer
    assert answer.choices[0].finish_reason in ("stop", "length"), answer
    assert answer.usage.prompt_tokens > 12, answer.usage  # image tokens included
    assert answer.usage.completion_tokens > 0, answer.usage
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    stream = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=12, seed=1, stream=True
    )
    pieces = []
    roles = []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
    streamed = "".join(pieces)
    assert roles[:1] == ["assistant"], roles
    assert streamed == text, (streamed, text)

    two = client.chat.completions.create(model=model, messages=messages, n=2, max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1], two
    assert two.usage.completion_tokens == 8, two.usage

    try:
        client.chat.completions.create(model=model, messages=messages, n=17)
    except openai.BadRequestError as e:
        assert "n" in str(e), e
    else:
        raise AssertionError("n=17 was accepted")
    print("openai client OK:", repr(text))


if __name__ == "__main__":
    main()
