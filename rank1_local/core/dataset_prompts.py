"""The dataset prompts of the official rank1 evaluation (orionw/rank1, ``prompts.py``), byte for byte.

The query replaces ``FILL_QUERY_HERE``. Several templates end in blank lines or trailing spaces: they are part of
the prompt the models were evaluated with. :func:`dataset_prompt` picks a template as the official ``get_prompt``
does: ``"<task>_<subset>"`` when it exists, else the task's own, else none.
"""

from __future__ import annotations

import difflib

from rank1_local.core.errors import Rank1Error

NO_PROMPT = "none"  # ``--dataset none``: score without a dataset prompt, on purpose

DATASET_PROMPTS: dict[str, str] = {
    'SciFact': 'Claim: FILL_QUERY_HERE\n\nA relevant passage would provide evidence that either **supports** or **refutes** this claim. A passage with any information on any related subpart should be relevant.',
    'ClimateFEVER': 'I am looking to write an essay for and need to find evidence the supports or contradict this statement:\n\nFILL_QUERY_HERE\n\nIf the passage provides information that supports or contradicts it in any way it is relevant so I can cite it.\n\n',
    'TRECCOVID': 'FILL_QUERY_HERE If the article answers any part of the question it is relevant.',
    'ArguAna': 'I am looking to write an essay and need to find counterarguments against this statement:\n\nFILL_QUERY_HERE\n\nDoes this passage have any counterargument or evidence that could be used to help me?\n\n',
    'DBPedia': 'I am looking to write an essay on this topic and need as much related background information to help me. The topic is:\n\nFILL_QUERY_HERE\n\nIf the passage provides any background information that could be connected it is relevant.\n\n',
    'FiQA2018': 'FILL_QUERY_HERE Find a passage that would be a good answer from StackExchange.',
    'NFCorpus': 'Topic: FILL_QUERY_HERE\n\nGiven the above topic, I need to learn about all aspects of it. It does not need to be directly relevant, only tangentially informational. Please mark as relevant any passages with even weak connections. I need to learn fast for my job, which means I need to understand each part individually.\n\nAgain remember, any connection means relevant even if indirect. So if it is not addressed, that is okay -- it does not need to be explicitly. \n\nFind me passages with any type of connection, including weak connections!!!!',
    'Touche2020': 'I am looking to write an essay and need to find arguments for or against this statement:\n\nFILL_QUERY_HERE\n\nDoes this passage have any argument or evidence that could be used to help me?\n\n',
    'SCIDOCS': 'papers that could be cited in FILL_QUERY_HERE. Anything with even indirect relevance should be relevant. This includes papers in the same broader field of science',
    'BrightRetrieval_aops': 'Find different but similar math problems to FILL_QUERY_HERE\n\nA document is relevant if it uses the same class of functions and shares **any** overlapping techniques.',
    'BrightRetrieval_theoremqa_questions': 'Find a passage which uses the same mathematical process as this one: FILL_QUERY_HERE',
    'BrightRetrieval_leetcode': 'I am looking to find different problems that share similar data structures (of any kind) or algorithms (e.g. DFS, DP, sorting, traversals, etc.). I am looking for problems that share one or both of these similarities to this:\n    \nFILL_QUERY_HERE\n\nDoes this passage share any similarities? e.g. if there was a textbook on leetcode problems, this would be in the same book even though it could be in a different chapter. \n\n\n',
    'BrightRetrieval_pony': 'I will use the programming language pony. Problem: FILL_QUERY_HERE\n\nBut to solve the problem above, I need to know things about pony. A passage is relevant if it contains docs that match **any** part (even basic parts) of the code I will have to write for the above program.',
    'BrightRetrieval': 'Can you find background information about the concepts used to answer the question:\n\nFILL_QUERY_HERE\n\nA passage is relevant if it contains background information about a **sub-concept** that someone might cite/link to when answering the above question.',
    'BrightRetrieval_theoremqa_theorems': 'Find a passage which uses the same mathematical process as this one: FILL_QUERY_HERE',
}


def dataset_prompt(task: str, subset: str | None = None) -> str | None:
    """The official template for an MTEB task name (and subset), or None for tasks evaluated without one."""
    if task not in DATASET_PROMPTS:
        return None
    if subset is not None and f"{task}_{subset}" in DATASET_PROMPTS:
        return DATASET_PROMPTS[f"{task}_{subset}"]
    return DATASET_PROMPTS[task]


def _tasks() -> dict[str, str]:
    """Known task names (the part before ``_``), lower-cased -> as the official code spells them."""
    names = {key.split("_", 1)[0] for key in DATASET_PROMPTS}
    return {name.lower(): name for name in names}


def resolve_dataset(name: str) -> str | None:
    """The official template for ``TASK[/SUBSET]`` (task and subset matched without regard to case; a subset without
    its own template gets the task's, as the official ``get_prompt`` does), or None for :data:`NO_PROMPT`.

    Any other name is refused with the close matches: a misspelt task would otherwise be scored silently without
    its prompt. A task the official evaluation runs without a dataset prompt is named ``none``."""
    task, _, subset = name.strip().partition("/")
    if task.lower() == NO_PROMPT and not subset:
        return None
    tasks = _tasks()
    official = tasks.get(task.lower())
    if official is None:
        close = difflib.get_close_matches(task.lower(), list(tasks), n=3, cutoff=0.5)
        hint = f"close matches: {', '.join(tasks[c] for c in close)}; " if close else ""
        raise Rank1Error(f"no dataset prompt for {task!r} ({hint}known: {', '.join(sorted(tasks.values()))}). For a "
                         f"task the official evaluation scores without a dataset prompt, give the dataset as "
                         f"'{NO_PROMPT}' (or leave it out)")
    if subset:
        for key, template in DATASET_PROMPTS.items():
            if key.lower() == f"{official}_{subset}".lower():
                return template
    return DATASET_PROMPTS[official]
