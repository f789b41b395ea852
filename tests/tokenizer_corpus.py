"""A deterministic tokenizer test corpus: every kind of text a tokenizer gets wrong first.

Built from word lists and templates in this file with a fixed-seed integer PRNG (splitmix64),
so it is the same on every machine and Python version and needs nothing from the network.
``categories()`` maps a category name to its strings; ``corpus()`` is all of them in order.
Special-token texts of all three synthetic vocabulary styles (Llama 3, Qwen 2.5, Llama 2) and
of other model families appear inside ordinary text, so each vocabulary sees its own specials
and the others' as plain text.
"""

# The corpus is multilingual and full of look-alike characters on purpose.
# ruff: noqa: RUF001

from __future__ import annotations

import functools
import unicodedata

__all__ = ["SPECIAL_TEXTS", "categories", "corpus"]


class _Rng:
    """splitmix64: tiny, fast, and identical everywhere."""

    def __init__(self, seed: int) -> None:
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def choice(self, seq: tuple[str, ...] | list[str]) -> str:
        return seq[self.below(len(seq))]

    def chance(self, percent: int) -> bool:
        return self.below(100) < percent


def _w(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_ENGLISH = _w("""
the of and to a in is it you that he was for on are with as I his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river
car feet care second book carry took science eat room friend began idea fish mountain stop
once base hear horse cut sure watch color face wood main enough plain girl usual young ready
above ever red list though feel talk bird soon body dog family direct pose leave song measure
door product black short numeral class wind question happen complete ship area half rock
order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast verb
sing listen six table travel less morning ten simple several vowel toward war lay against
pattern slow center love person money serve appear road map rain rule govern pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star
box noun field rest correct able pound done beauty drive stood contain front teach week final
gave green oh quick develop ocean warm free minute strong special mind behind clear tail
produce fact street inch multiply nothing course stay wheel full force blue object decide
surface deep moon island foot system busy test record boat common gold possible plane stead
dry wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring
yes distant fill east paint language among grand ball yet wave drop heart am present heavy
dance engine position arm wide sail material size vary settle speak weight general ice matter
circle pair include divide syllable felt perhaps pick sudden count square reason length
represent art subject region energy hunt probable bed brother egg ride cell believe fraction
forest sit race window store summer train sleep prove lone leg exercise wall catch mount wish
sky board joy winter sat written wild instrument kept glass grass cow job edge sign visit past
soft fun bright gas weather month million bear finish happy hope flower clothe strange gone
jump baby eight village meet root buy raise solve metal whether push seven paragraph third
shall held hair describe cook floor either result burn hill safe cat century consider type
law bit coast copy phrase silent tall sand soil roll temperature finger industry value fight
lie beat excite natural view sense ear else quite broke case middle kill son lake moment scale
loud spring observe child straight consonant nation dictionary milk speed method organ pay
age section dress cloud surprise quiet stone tiny climb cool design poor lot experiment bottom
key iron single stick flat twenty skin smile crease hole trade melody trip office receive row
mouth exact symbol die least trouble shout except wrote seed tone join suggest clean break lady
yard rise bad blow oil blood touch grew cent mix team wire cost lost brown wear garden equal
sent choose fell fit flow fair bank collect save control decimal gentle woman captain practice
separate difficult doctor please protect noon whose locate ring character insect caught period
indicate radio spoke atom human history effect electric expect crop modern element hit student
corner party supply bone rail imagine provide agree thus capital chair danger fruit rich thick
soldier process operate guess necessary sharp wing create neighbor wash bat rather crowd corn
compare poem string bell depend meat rub tube famous dollar stream fear sight thin triangle
planet hurry chief colony clock mine tie enter major fresh search send yellow gun allow print
dead spot desert suit current lift rose continue block chart hat sell success company subtract
event particular deal swim term opposite wife shoe shoulder spread arrange camp invent cotton
born determine quart nine truck noise level chance gather shop stretch throw shine property
column molecule select wrong gray repeat require broad prepare salt nose plural anger claim
""")

_NAMES = _w("""
Alice Bob Carol Dave Eve Mallory Trent Peggy Victor Walter Oscar Zoë Łukasz Søren Chloé José
Renée François Björn Øystein Åsa Mühlenberg O'Brien McDonald DeAngelo Van Der Berg
""")

_ACCENTED = _w("""
café naïve résumé façade déjà-vu crème brûlée élève Noël Hôtel über Straße Größe Mädchen
Fräulein Öl Ähnlichkeit niño señor año mañana ¿Qué ¡Hola! acción pingüino São Paulo coração
informação Łódź żółć źdźbło gęś Brno příliš žluťoučký kůň úpěl ďábelské ódy Şanlıurfa ağaç
çiçek İstanbul ılık ığdır Reykjavík Þórður Eyjafjallajökull Tiếng Việt người Hà Nội phở
nguyễn Ελλάδα γεια σου καλημέρα ευχαριστώ Αθήνα λόγος привет мир Москва спасибо хорошо
Ёжик ЭТО ВСЁ Київ ґанок їжак Србија ђак ћерка ǅemal ǈ ǋ ﬁnance ﬂow Æsir œuvre Œdipe
""")

_CJK = _w("""
你好 世界 你好世界 中文 我们 今天天气很好 学习 人工智能 机器学习 北京 上海 中国 谢谢 不客气 朋友
时间 问题 数据 模型 计算机 网络 服务器 我爱你 早上好 晚安 繁體中文 臺灣 香港 こんにちは ありがとう
日本語 東京 大阪 カタカナ ひらがな すみません おはよう さようなら 漢字 コンピュータ 機械学習
私は学生です ｶﾀｶﾅ ﾊﾝｶｸ 안녕하세요 감사합니다 한국어 서울 사랑해 컴퓨터 학교 친구 𠀀 𠜎 𪚥 𫠠 丂
""")

_CJK_PUNCT = ("，", "。", "！", "？", "、", "「", "」", "：", "（", "）", "《", "》", "…", "　")

_SCRIPTS = (
    "مرحبا بالعالم", "شُكْرًا جَزِيلًا", "اللغة العربية ١٢٣ ٤٥٦", "שלום עולם", "תּוֹדָה רַבָּה",
    "नमस्ते दुनिया", "हिन्दी भाषा ४२", "क्षत्रिय", "สวัสดีครับ ขอบคุณ", "ภาษาไทย ๑๒๓",
    "வணக்கம் தமிழ்", "বাংলা ভাষা", "ગુજરાતી", "ਪੰਜਾਬੀ", "മലയാളം", "ಕನ್ನಡ", "తెలుగు",
    "ქართული ენა", "Հայերեն լեզու", "ሰላም ዓለም", "ᠮᠣᠩᠭᠣᠯ", "བོད་ཡིག", "ខ្មែរ", "မြန်မာ",
    "ລາວ", "ᏣᎳᎩ", "ᚠᚢᚦᚨᚱᚲ", "𐌰𐌱𐌲", "𓀀𓀁𓀂", "ἐν ἀρχῇ ἦν ὁ λόγος", "Ⅻ ⅻ ⅷ",
)

_EMOJI = (
    "😀", "😂", "🥲", "😍", "🤔", "👍", "👎", "🙏", "🎉", "🔥", "✨", "🚀", "💡", "✅", "❌",
    "⚠️", "❤️", "❤", "💔", "🌍", "🍕", "☕", "🐍", "🦀", "📦", "🧠", "⭐", "🌈", "🎵",
    "👨\u200d👩\u200d👧\u200d👦", "👩\u200d💻", "👨🏽\u200d🚀", "🏳️\u200d🌈", "🏴\u200d☠️",
    "🧑🏿\u200d🤝\u200d🧑🏻", "👋🏻", "👋🏿", "🇺🇸", "🇯🇵", "🇫🇷", "🇩🇪", "🇧🇷", "1️⃣", "#️⃣",
    "*️⃣", "©", "™", "→", "…", "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
    "🫠", "🫶🏽", "🧌", "🪿", "\u2764\ufe0e",
)  # fmt: skip

_SYMBOLS = (
    "€", "£", "¥", "°", "±", "×", "÷", "≤", "≥", "≠", "∞", "√", "π", "µ", "§", "¶", "«", "»",
    "“", "”", "‘", "’", "—", "–", "•", "½", "¼", "²", "³", "‰", "←", "↑", "↓", "∑", "∫", "∂",
    "ℕ", "ℝ", "℃", "№", "⌘", "⌥", "♠", "♥", "♪", "☃", "✓", "✗", "⟨", "⟩", "‽", "⁂", "¿", "¡",
)  # fmt: skip

# Special-token texts (ours and other families'); a vocabulary that does not have one sees
# plain text. "[PAD8150]" style names are the synthetic vocabularies' unused fillers.
SPECIAL_TEXTS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_7|>", "<|im_start|>",
    "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<|vision_pad|>", "<|object_ref_start|>", "<s>", "</s>", "<unk>", "<0x0A>", "<0x41>",
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<think>", "</think>", "<|end|>",
    "<end_of_turn>", "<|channel|>", "<pad>", "<mask>", "[PAD8150]", "[PAD2000]",
)  # fmt: skip

_CODE = (
    'def {a}({b}, {c}=None):\n    """Return the {a} of {b}."""\n    if {c} is None:\n'
    "        {c} = []\n    for i in range(len({b})):\n        {c}.append({b}[i] * 2)\n"
    "    return {c}\n",
    "class {A}:\n    def __init__(self, {b}: int) -> None:\n        self.{b} = {b}\n\n"
    '    def __repr__(self) -> str:\n        return f"{A}({b}={{self.{b}!r}})"\n',
    "import os\nimport sys\nfrom pathlib import Path\n\n{a} = Path(sys.argv[1])\n"
    'if not {a}.exists():\n    print(f"missing: {{{a}}}", file=sys.stderr)\n    sys.exit(1)\n',
    "#include <stdio.h>\n#include <stdlib.h>\n\nint {a}(int {b}, char **{c}) {{\n"
    '    for (int i = 0; i < {b}; ++i) {{\n        printf("%s\\n", {c}[i]);\n    }}\n'
    "    return 0;\n}}\n",
    "const {a} = async ({b}) => {{\n  const res = await fetch(`/api/{b}/${{{b}.id}}`);\n"
    "  if (!res.ok) throw new Error(res.statusText);\n  return res.json();\n}};\n",
    "fn {a}({b}: &[u8]) -> Result<usize, Error> {{\n    let mut {c} = 0usize;\n"
    "    for &x in {b}.iter() {{\n        {c} += x as usize;\n    }}\n    Ok({c})\n}}\n",
    '{{\n  "{a}": {{\n    "{b}": [1, 2, 3],\n    "{c}": true,\n    "name": "{A}",\n'
    '    "value": null\n  }}\n}}',
    '<div class="{a}">\n  <p id="{b}">Hello &amp; welcome</p>\n'
    '  <a href="https://example.com/{c}?q=1&x=2">link</a>\n</div>\n',
    "SELECT {a}, COUNT(*) AS n\nFROM {b}\nWHERE {c} > 10 AND {a} IS NOT NULL\n"
    "GROUP BY {a}\nORDER BY n DESC;",
    "#!/bin/bash\nset -euo pipefail\nfor f in ./{a}/*.txt; do\n"
    '    echo "$f" | grep -q \'{b}\' && cp "$f" /tmp/{c}/\ndone\n',
    "if ({a} != {b} && {c} >= 0) {{\n\t{a} += {c};\n\t{b} -= 1;\n}} else {{\n\treturn -1;\n}}",
    "x = [i ** 2 for i in range(10) if i % 2 == 0]\n{a} = {{k: v for k, v in zip(x, x)}}\n"
    "assert {a}[4] == 4, '{b} failed'\n",
    '- name: {a}\n  image: {b}:latest\n  ports:\n    - "8080:80"\n  env:\n    {C}: "true"\n',
    "# {A}\n\n* item `{a}`\n* **bold** _{b}_\n\n```python\nprint({c!r})\n```\n\n"
    "| a | b |\n|---|---|\n",
    r"^(?P<{a}>[A-Za-z_]\w*)\s*=\s*(\d+|'[^']*')$  # {b}\\n\t{c}",
    "{a} := map[string]int{{\"{b}\": 1}}\nif v, ok := {a}[\"{c}\"]; !ok {{\n\tpanic(v)\n}}",
)


def _number(rng: _Rng) -> str:
    r = rng.below(16)
    forms = (
        lambda: str(rng.below(10)),
        lambda: str(rng.below(100)),
        lambda: str(1900 + rng.below(130)),
        lambda: f"{rng.below(1000)}.{rng.below(100):02d}",
        lambda: f"${rng.below(500)}.{rng.below(100):02d}",
        lambda: f"-{rng.below(100)}%",
        lambda: f"{2000 + rng.below(30)}-{1 + rng.below(12):02d}-{1 + rng.below(28):02d}",
        lambda: f"{rng.below(24):02d}:{rng.below(60):02d}:{rng.below(60):02d}",
        lambda: f"{rng.below(1_000_000_000):,}",
        lambda: f"0x{rng.below(1 << 32):08X}",
        lambda: f"v{rng.below(5)}.{rng.below(20)}.{rng.below(10)}",
        lambda: str(rng.below(10**12)),
        lambda: f"{rng.below(10)}e-{rng.below(20)}",
        lambda: f"+1 ({rng.below(1000):03d}) {rng.below(1000):03d}-{rng.below(10000):04d}",
        lambda: f"{rng.below(100)}½",
        lambda: "1" * (1 + rng.below(14)),
    )
    return forms[r]()


def _sentence(rng: _Rng, n_words: int) -> str:
    words: list[str] = []
    for _ in range(n_words):
        r = rng.below(100)
        if r < 75:
            w = rng.choice(_ENGLISH)
        elif r < 82:
            w = rng.choice(_NAMES)
        elif r < 88:
            w = _number(rng)
        elif r < 93:
            w = rng.choice(_ENGLISH).upper()
        elif r < 97:
            w = rng.choice(_ENGLISH).title()
        else:
            w = rng.choice(_SYMBOLS)
        if rng.chance(8):
            w += rng.choice((",", ";", ":", " -", " —", "'s", "s'"))
        words.append(w)
    words[0] = words[0][:1].upper() + words[0][1:]
    s = " ".join(words) + rng.choice((".", ".", ".", "!", "?", "...", "?!", ""))
    if rng.chance(10):
        s = f'"{s}"' if rng.chance(50) else f"({s})"
    return s


def _prose(rng: _Rng) -> list[str]:
    out = [_sentence(rng, 3 + rng.below(20)) for _ in range(120)]
    for _ in range(30):
        out.append(" ".join(_sentence(rng, 4 + rng.below(14)) for _ in range(2 + rng.below(5))))
    for _ in range(10):
        paras = ["  ".join(_sentence(rng, 5 + rng.below(12)) for _ in range(3))
                 for _ in range(2 + rng.below(3))]
        out.append("\n\n".join(paras))
    return out


def _accented(rng: _Rng) -> list[str]:
    out = [" ".join(rng.choice(_ACCENTED) for _ in range(2 + rng.below(9))) + "."
           for _ in range(60)]
    for word in ("café", "naïve", "Ångström", "Việt", "résumé", "Größe", "ǅemal", "İstanbul"):
        out.append(unicodedata.normalize("NFD", word))  # decomposed: llama.cpp keeps it so
        out.append(f"{word} vs {unicodedata.normalize('NFD', word)}")
        out.append(word.upper() + " " + word.lower() + " " + word.title())
    return out


def _cjk(rng: _Rng) -> list[str]:
    out: list[str] = []
    for _ in range(70):
        parts = []
        for _ in range(2 + rng.below(8)):
            r = rng.below(10)
            if r < 6:
                parts.append(rng.choice(_CJK))
            elif r < 7:
                parts.append(_number(rng))
            elif r < 8:
                parts.append(rng.choice(_ENGLISH))
            else:
                parts.append(rng.choice(_CJK_PUNCT))
        out.append(("" if rng.chance(70) else " ").join(parts))
    out += ["全角ＡＢＣ１２３", "ｈｅｌｌｏ　ｗｏｒｌｄ", "一二三四五六七八九十", "〇〡〢〣"]
    return out


def _scripts(rng: _Rng) -> list[str]:
    out = list(_SCRIPTS)
    for _ in range(30):
        out.append(" ".join(rng.choice(_SCRIPTS) for _ in range(2 + rng.below(3))) +
                   rng.choice((".", "!", "", " 42", "؟", "।")))
    return out


def _emoji(rng: _Rng) -> list[str]:
    out = list(_EMOJI)
    for _ in range(40):
        parts = [rng.choice(_EMOJI) if rng.chance(50) else rng.choice(_ENGLISH)
                 for _ in range(2 + rng.below(8))]
        out.append(("" if rng.chance(40) else " ").join(parts))
    out += ["".join(_EMOJI[:20]), "🇺🇸🇯🇵🇫🇷", "👍🏻👍🏼👍🏽👍🏾👍🏿", "a👍b", "1️⃣2️⃣3️⃣"]
    return out


def _code(rng: _Rng) -> list[str]:
    out: list[str] = []
    for i in range(96):
        tpl = _CODE[i % len(_CODE)]
        a, b, c = (rng.choice(_ENGLISH) for _ in range(3))
        if rng.chance(30):
            a = f"{a}_{b}"
        if rng.chance(20):
            b = f"{b}{rng.below(100)}"
        text = tpl.format(a=a, b=b, c=c, A=a.title().replace("_", ""), C=c.upper())
        if rng.chance(30):
            text = text.replace("    ", "\t")
        if rng.chance(15):
            text = text.replace("\n", "\r\n")
        out.append(text)
    return out


_SPACES = (" ", "  ", "   ", "    ", "\t", "\t\t", " \t", "\t ", "\n", "\n\n", "\n\n\n", "\r\n",
           "\r", " \n", "\n ", " \n ", "\n\t", "\v", "\f", "\u00a0", "\u3000", "\u2003",
           "\u2009", "\u202f", "\u205f", "\u1680", "\u2028", "\u2029", "\u0085", "\x1c", "\x1f",
           "\u200b", "\ufeff", "        ", "\n\n\n\n\n\n\n\n", " " * 17, "\t" * 9)


def _whitespace(rng: _Rng) -> list[str]:
    out = list(_SPACES)
    for sp in _SPACES:
        out.append(f"{sp}hello{sp}world{sp}")
        out.append(f"a{sp}1{sp}!{sp}")
    for _ in range(40):
        words = [rng.choice(_ENGLISH) for _ in range(2 + rng.below(6))]
        text = "".join(w + rng.choice(_SPACES) for w in words)
        if rng.chance(50):
            text = rng.choice(_SPACES) + text
        out.append(text)
    return out


def _numbers(rng: _Rng) -> list[str]:
    out = [_number(rng) for _ in range(50)]
    out += ["1234567890" * k for k in (1, 2, 3)]
    out += [str(10**k) for k in range(0, 16, 3)] + ["3.14159265358979", "-0.5", "1e10", "1,000"]
    out += ["٠١٢٣٤٥٦٧٨٩", "०१२३४५६७८९", "０１２３４５６７８９", "²³¹⁴", "½¼¾⅓", "①②③", "Ⅰ Ⅱ Ⅲ Ⅳ",
            "𝟙𝟚𝟛", "12abc34", "abc123def456", "1 2  3   4", "a1b22c333d4444", "9" * 40]
    for _ in range(20):
        out.append(f"Order #{rng.below(100000)} costs {_number(rng)} on {_number(rng)}.")
    return out


def _contractions(rng: _Rng) -> list[str]:
    base = ("don't", "DON'T", "Don'T", "it's", "IT'S", "It'S", "we'll", "WE'LL", "We'Ll",
            "they're", "THEY'RE", "I've", "I'VE", "I'm", "I'M", "she'd", "SHE'D", "'s", "'S",
            "'ll", "'LL", "'re", "'Re", "'ve", "'VE", "'m", "'M", "'d", "'D", "'t", "'T",
            "’s", "don’t", "''s", "'''", "x'sy", "'s'", "rock'n'roll", "o'clock", "y'all",
            "'tis", "ma'am", "the 90's", "'ſ", "'K", "James' book", "' s", "'  s",
            # what llama_detokenize's clean-up pass rewrites
            "a , b . c ? d ! e", "it ' s", "don 't", "we 're", "they 've", "I 'm", "x 'll",
            "' hello '", " ' ' ' ", "end .", "wait ...", "so ' d", "a ,, b ..", "a ' 's",
            "x 'sm 're 've 'll")
    out = list(base)
    for _ in range(20):
        out.append(" ".join(rng.choice(base) if rng.chance(40) else rng.choice(_ENGLISH)
                            for _ in range(4 + rng.below(6))))
    return out


def _special(rng: _Rng) -> list[str]:
    out: list[str] = []
    for t in SPECIAL_TEXTS:
        out.append(t)
        out.append(f"Hello{t}world")
        out.append(f" {t} ")
    out += [
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
        '<tool_call>\n{"name": "get", "arguments": {}}\n</tool_call>',
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Again [/INST]",
        "<|eot_id|><|eot_id|><|eot_id|>", "<|<|eot_id|>|>", "<|eot_id", "eot_id|>", "<|eot_id|",
        "<<|im_end|>>", "<tool_call><tool_call>", "</tool_call></tool_call>x", "<s><s></s>",
        "<|im_start|><|im_end|>", "<|endoftext|><|im_end|>", "<|python_tag|>print(1)<|eom_id|>",
        "text<|reserved_special_token_3|>text", "<|end|><|im_end|><end_of_turn>",
        "\n<|im_start|>assistant\n", "<unk><unk>", "<0x0A><0x0B>", "<think>\nhmm\n</think>\n",
    ]
    for _ in range(30):
        a, b = rng.choice(SPECIAL_TEXTS), rng.choice(SPECIAL_TEXTS)
        out.append(f"{a}{_sentence(rng, 3 + rng.below(8))}{b}" + rng.choice(("", " ", "\n")))
    return out


_ODD = (
    "", " ", "a", "A", "1", "!", "'", '"', "\\", "\x00", "a\x00b", "\x01\x02\x03", "\x7f",
    "\x1b[31mred\x1b[0m", "\u0301", "\u0301\u0301\u0301", "a\u0301", " \u0301", "\u0308x",
    "\u20dd", "\u200b", "\u200c\u200d", "\u200e\u200f", "\u202a\u202e", "\u2060", "\ufeffBOM",
    "\ufffd", "\ufffe", "\uffff", "\ue000", "\uf8ff", "\U000f0000", "\U0010fffd", "\U0010ffff",
    "\u0378", "\u0380\u0381", "\U0002fffe", "\U000e0001\U000e0041\U000e007f", "\ufe0f", "\ufe0e",
    "\U000e0100", "\u2581", "\u2581\u2581 \u2581", "▁hello▁world", "Ġ", "Ġhello", "Ċ",
    "<0x", "0x0A", "\u00ad", "soft\u00adhyphen", "\u034f", "\u180e", "\u1160\u3164",
    "\U0001d400\U0001d401", "ﬀ ﬁ ﬂ", "Å Å Å", "ǈ ǉ", "ß ẞ", "İ ı", "\u0130\u0307",
    "\u0e33", "\u0f0b", "\u1d00", "\u2126 \u212a \u212b", "a" * 300, "ab" * 150,
    "\U00010d4a\U00010d4b garay", "\U000105c0\U000105c1'\U000105c2's", "\U00011380\U00011381",
    "\U00016d40'll \U00016d70\U00016d71\U00016d72\U00016d73", "\u1c89'S \ua7cb's",
    "\U0001e5d0\U0001e5f1\U0001e5ff", "\U00010940\U00010941's", "\U0002ebf0\U0002ebf1",
    "\U00031350's", "\u0897x\u1b4e", "\U0001ccf0\U0001ccf1\U0001ccf2\U0001ccf3",
)


def _odd() -> list[str]:
    out = list(_ODD)
    for ch in ("\u0301", "\u200d", "\ufe0f", "\U000e0041", "\x00"):
        out.append(f"{ch}hello {ch} world{ch}")
    return out


def _mixed(rng: _Rng) -> list[str]:
    parts_pool = (_prose, _accented, _cjk, _scripts, _emoji, _code, _whitespace, _numbers,
                  _contractions, _special)
    pools = [f(_Rng(1000 + i)) for i, f in enumerate(parts_pool)]
    out: list[str] = []
    for _ in range(50):
        pieces = [rng.choice(pools[rng.below(len(pools))]) for _ in range(3 + rng.below(6))]
        out.append(rng.choice(("\n", " ", "", "\n\n")).join(pieces))
    return out


@functools.cache
def categories() -> dict[str, tuple[str, ...]]:
    """Category name -> strings, each category from its own seeded generator."""
    gens = {
        "prose": _prose, "accented": _accented, "cjk": _cjk, "scripts": _scripts,
        "emoji": _emoji, "code": _code, "whitespace": _whitespace, "numbers": _numbers,
        "contractions": _contractions, "special": _special, "mixed": _mixed,
    }
    out = {name: tuple(gen(_Rng(0x5052494D41 + i))) for i, (name, gen) in enumerate(gens.items())}
    out["odd"] = tuple(_odd())
    return out


@functools.cache
def corpus() -> tuple[str, ...]:
    """Every corpus string, category by category (duplicates removed, order kept)."""
    seen: dict[str, None] = {}
    for strings in categories().values():
        for s in strings:
            seen.setdefault(s, None)
    return tuple(seen)
