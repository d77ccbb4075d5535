"""A handful of rows per benchmark, written in each release's published layout, with generated images.

For tests and for the README example (scripts/make_bench_fixtures.py): the files, folders, column names,
types and image storage (Hugging Face `Image` structs in parquet, image files beside JSON/JSONL) are the
releases' own, as their dataset cards describe (GeoEval, which has none: as its release's code reads them);
the questions and pictures are made up, so nothing here is benchmark content. `write_fixtures(folder)`
writes one sub-folder per benchmark, as `--bench-dir` expects.
"""

from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw

__all__ = ["write_fixtures"]


def _picture(label: str, color: str, size: tuple[int, int] = (64, 48)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([4, 4, size[0] - 5, size[1] - 5], outline=color, width=3)
    draw.text((10, size[1] // 2 - 6), label, fill="black")
    return img


def _parquet(rows: list[dict], features: dict, path: str) -> None:
    from datasets import Dataset, Features
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # one bar per file is noise in tests and in the fixture script
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Dataset.from_list(rows, features=Features(features)).to_parquet(path)


def _mathvista(root: str) -> None:
    from datasets import Image as HFImage, Sequence, Value

    from calibrl.bench.mathvista import build_query

    meta = lambda task, skills, grade="high school": {  # noqa: E731
        "category": "math-targeted-vqa", "context": "synthetic scene", "grade": grade, "img_height": 48,
        "img_width": 64, "language": "english", "skills": skills, "source": "fixture", "split": "testmini",
        "task": task}
    rows = [
        dict(pid="1", question="What fraction of the shape is blue?", choices=["3/11", "8/11", "6/11", "3/5"],
             unit=None, precision=None, answer="8/11", question_type="multi_choice", answer_type="text",
             metadata=meta("math word problem", ["arithmetic reasoning"])),
        dict(pid="2", question="Which number is missing?", choices=None, unit=None, precision=None, answer="14",
             question_type="free_form", answer_type="integer",
             metadata=meta("figure question answering", ["logical reasoning", "arithmetic reasoning"])),
        dict(pid="3", question="How much money does Luca need to buy both candies?", choices=None, unit="$",
             precision=2.0, answer="1.45", question_type="free_form", answer_type="float",
             metadata=meta("math word problem", ["arithmetic reasoning"], "elementary school")),
        dict(pid="4", question="What is the fraction of females facing the camera?", choices=None, unit=None,
             precision=1.0, answer="0.6", question_type="free_form", answer_type="float",
             metadata=meta("visual question answering", ["numeric commonsense", "arithmetic reasoning"])),
        dict(pid="5", question="Between which two years does the line graph reach its maximum?", choices=None,
             unit=None, precision=None, answer="[2007, 2008]", question_type="free_form", answer_type="list",
             metadata=meta("figure question answering", ["statistical reasoning"])),
        dict(pid="6", question="The derivative of f(x) at x=2 is ____ that at x=5", unit=None, precision=None,
             choices=["larger than", "equal to", "smaller than"], answer="equal to", question_type="multi_choice",
             answer_type="text", metadata=meta("textbook question answering", ["algebraic reasoning"], "college")),
    ]
    for i, row in enumerate(rows):
        row.update(image=f"images/{row['pid']}.jpg", decoded_image=_picture(f"MV {row['pid']}", "blue"),
                   query=build_query(row))
    features = {
        "pid": Value("string"), "question": Value("string"), "image": Value("string"), "decoded_image": HFImage(),
        "choices": Sequence(Value("string")), "unit": Value("string"), "precision": Value("float64"),
        "answer": Value("string"), "question_type": Value("string"), "answer_type": Value("string"),
        "metadata": {"category": Value("string"), "context": Value("string"), "grade": Value("string"),
                     "img_height": Value("int64"), "img_width": Value("int64"), "language": Value("string"),
                     "skills": Sequence(Value("string")), "source": Value("string"), "split": Value("string"),
                     "task": Value("string")},
        "query": Value("string"),
    }
    _parquet(rows, features, os.path.join(root, "MathVista", "data", "testmini-00000-of-00001.parquet"))


def _mathverse(root: str) -> None:
    from datasets import Image as HFImage, Value

    mc = "As shown in the figure, circle O has radius 1.0 and angle BAC = 60.0. The length of BC is ()"
    choices = "\nChoices:\nA:2\nB:2\\sqrt{3}\nC:\\sqrt{3}\nD:2\\sqrt{2}"
    versions = [("Text Dominant", mc + choices), ("Text Lite", "Find the length of BC." + choices),
                ("Vision Intensive", "Find BC." + choices), ("Vision Dominant", "Find BC." + choices),
                ("Vision Only", "")]
    rows = []
    for k, (version, question) in enumerate(versions):
        rows.append(dict(sample_index=str(k + 1), problem_index="1", problem_version=version, question=question,
                         image=_picture(f"O {k}", "red"), answer="C", question_type="multi-choice"))
    for k, version in enumerate(("Text Dominant", "Vision Only")):
        rows.append(dict(sample_index=str(6 + k), problem_index="2", problem_version=version,
                         question="" if version == "Vision Only" else "The area of the square is 16. What is its "
                                                                       "side length?",
                         image=_picture(f"S {k}", "green"), answer="4", question_type="free-form"))
    for row in rows:
        row["metadata"] = {"split": "testmini", "source": "fixture", "subject": "plane geometry",
                           "subfield": "length" if row["problem_index"] == "1" else "area"}
        lead = ("According to the question shown in the image, please directly answer the question and provide the "
                "correct option letter, e.g., A, B, C, D.") if row["question_type"] == "multi-choice" else (
                "According to the question shown in the image, please directly answer the question and provide the "
                "final value, e.g., 1, 2.5, 300.")
        row["query_wo"] = lead + ("\nQuestion: " + row["question"] if row["question"] else "")
        row["query_cot"] = row["query_wo"]
        row["question_for_eval"] = row["question"] or "(question in the image)"
    features = {"sample_index": Value("string"), "problem_index": Value("string"), "problem_version": Value("string"),
                "question": Value("string"), "image": HFImage(), "answer": Value("string"),
                "question_type": Value("string"),
                "metadata": {"split": Value("string"), "source": Value("string"), "subject": Value("string"),
                             "subfield": Value("string")},
                "query_wo": Value("string"), "query_cot": Value("string"), "question_for_eval": Value("string")}
    _parquet(rows, features, os.path.join(root, "MathVerse", "testmini.parquet"))


def _mathvision(root: str) -> None:
    from datasets import Image as HFImage, Sequence, Value

    rows = [
        dict(id="1", question="Which of the shapes has the most corners?\n<image1>", options=["A", "B", "C", "D", "E"],
             answer="C", level=1, subject="counting"),
        dict(id="2", question="<image1>\nHow many small squares are there in the picture?", options=[], answer="12",
             level=2, subject="counting"),
        dict(id="3", question="What share of the circle is shaded?\n<image1>", options=[], answer="\\frac{1}{2}",
             level=3, subject="metric geometry - area"),
        dict(id="4", question="Which value is the perimeter?\n<image1>", options=["8", "10", "12", "16", "20"],
             answer="D", level=2, subject="metric geometry - length"),
    ]
    for row in rows:
        row.update(image=f"images/{row['id']}.jpg", decoded_image=_picture(f"K {row['id']}", "purple"), solution="")
    features = {"id": Value("string"), "question": Value("string"), "options": Sequence(Value("string")),
                "image": Value("string"), "decoded_image": HFImage(), "answer": Value("string"),
                "solution": Value("string"), "level": Value("int64"), "subject": Value("string")}
    _parquet(rows, features, os.path.join(root, "MathVision", "data", "test-00000-of-00001.parquet"))


def _mmmu(root: str) -> None:
    from datasets import Image as HFImage, Value

    def row(item_id, question, options, answer, qtype, images, subfield, difficulty="Medium"):
        out = dict(id=item_id, question=question, options=str(options), explanation="", answer=answer,
                   question_type=qtype, topic_difficulty=difficulty, subfield=subfield,
                   img_type=str(["Diagrams"] * len(images)))
        for n in range(1, 8):
            out[f"image_{n}"] = images[n - 1] if n <= len(images) else None
        return out

    math_rows = [
        row("validation_Math_1", "<image 1> shows f and <image 2> shows g. Which function is increasing?",
            ["f", "g", "both", "neither"], "A", "multiple-choice",
            [_picture("f", "blue"), _picture("g", "red")], "Calculus", "Easy"),
        row("validation_Math_2", "Estimate the area of the unit circle in <image 1> to two decimals.", [], "3.14",
            "open", [_picture("circle", "black")], "Geometry"),
        row("validation_Math_3", "Give the slope of the line in <image 1>.", [], "['1.5', '3/2']", "open",
            [_picture("line", "green")], "Algebra", "Hard"),
    ]
    art_rows = [
        row("validation_Art_Theory_1", "Which painting is in the style of <image 1>?",
            ["<image 2>", "<image 3>", "<image 4>"], "B", "multiple-choice",
            [_picture("ref", "orange"), _picture("p1", "gray"), _picture("p2", "brown"), _picture("p3", "pink")],
            "Art History"),
    ]
    features = {"id": Value("string"), "question": Value("string"), "options": Value("string"),
                "explanation": Value("string"), **{f"image_{n}": HFImage() for n in range(1, 8)},
                "img_type": Value("string"), "answer": Value("string"), "topic_difficulty": Value("string"),
                "question_type": Value("string"), "subfield": Value("string")}
    _parquet(math_rows, features, os.path.join(root, "MMMU", "Math", "validation-00000-of-00001.parquet"))
    _parquet(art_rows, features, os.path.join(root, "MMMU", "Art_Theory", "validation-00000-of-00001.parquet"))


def _wemath(root: str) -> None:
    from datasets import Image as HFImage, Value

    def row(group, key, number, question, option, answer, concept):
        return {"ID": group, "split": "testmini", "knowledge concept": concept, "question": question,
                "option": option, "answer": answer, "image_path": _picture(f"W{group}{key[-1]}", "navy"),
                "key": key, "question number": number, "knowledge concept description": f"About {concept}."}

    opts = "A. 4cm; B. 6cm; C. 8cm; D. 10cm; E. No correct answer"
    rows = [
        row("1", "2steps_1", 1, "What is the side length of the square?", opts, "A", "Side lengths"),
        row("1", "2steps_2", 2, "A square has side 4cm. What is its perimeter?",
            "A. 8cm; B. 12cm; C. 16cm; D. 20cm; E. No correct answer", "C", "Perimeter of squares"),
        row("1", "2steps_multi", 3, "What is the perimeter of the square in the figure?",
            "A. 8cm; B. 12cm; C. 16cm; D. 20cm; E. No correct answer", "C", "Perimeter of squares"),
        row("2", "3steps_1", 4, "What is the radius of the circle?", "A. 1m; B. 2m; C. 3m; D. 4m", "B",
            "Radius"),
        row("2", "3steps_2", 5, "What is the diameter of a circle of radius 2m?",
            "A. 2m; B. 3m; C. 4m; D. 6m", "C", "Diameter"),
        row("2", "3steps_3", 6, "What is the circumference of a circle of diameter 4m (pi = 3)?",
            "A. 6m; B. 8m; C. 12m; D. 16m", "C", "Circumference"),
        row("2", "3steps_multi", 7, "What is the circumference of the circle in the figure (pi = 3)?",
            "A. 6m; B. 8m; C. 12m; D. 16m", "C", "Circumference"),
    ]
    features = {"ID": Value("string"), "split": Value("string"), "knowledge concept": Value("string"),
                "question": Value("string"), "option": Value("string"), "answer": Value("string"),
                "image_path": HFImage(), "key": Value("string"), "question number": Value("int64"),
                "knowledge concept description": Value("string")}
    _parquet(rows, features, os.path.join(root, "We-Math", "data", "testmini-00000-of-00001.parquet"))


def _geometry3k(root: str) -> None:
    from datasets import Image as HFImage, Sequence, Value

    rows = [
        dict(images=[_picture("x", "black")], problem="<image>Find x.", answer="7.5", id=2401,
             choices=["5", "7.5", "10", "12.5"], ground_truth="B"),
        dict(images=[_picture("y", "black")], problem="<image>Find the area of the triangle. Round to the nearest "
             "tenth.", answer="2\\sqrt{221}", id=2402, choices=["14.9", "29.7", "59.5", "70.2"], ground_truth="B"),
        dict(images=[_picture("z", "black")], problem="<image>Find m \\angle 2.", answer="\\frac{40}{3}", id=2403,
             choices=["10", "\\frac{40}{3}", "15", "20"], ground_truth="B"),
    ]
    features = {"images": Sequence(HFImage()), "problem": Value("string"), "answer": Value("string"),
                "id": Value("int64"), "choices": Sequence(Value("string")), "ground_truth": Value("string")}
    _parquet(rows, features, os.path.join(root, "geometry3k", "data", "test-00000-of-00001.parquet"))


def _geoeval(root: str) -> None:
    folder = os.path.join(root, "GeoEval")
    os.makedirs(os.path.join(folder, "dataset_merge"), exist_ok=True)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)

    def row(source, problem, choices, answer, diagram=None, structure=None, semantic=None, shape=None, **extra):
        if diagram:
            _picture(diagram.split(".")[0], "black").save(os.path.join(folder, "images", diagram))
        out = {"dataset_name": source, "diagram_name": diagram,
               "diagram_description": {"structure": structure, "semantic": semantic} if structure else None,
               "text": {"Num_Exp": problem}, "choice_list": choices, "answer_value": answer,
               "solution": {"program": None, "equation": None, "cot": None},
               "formal_knowledge_point": None, "knowledge_point": None, "geometry_shape": shape}
        for key, value in extra.items():
            if key == "aug_problem":
                out["text"]["aug_problem"] = value
            elif key == "backward_semantic":
                out["diagram_description"]["backward_semantic"] = value
            else:
                out[key] = value
        return out

    subsets = {
        "select.json": {
            "1": row("PGPS9K", "Find x.", ["5", "7.5", "10", "12.5"], "7.5", "pgps_1.png", ["line A B C"],
                     ["AB = 5", "BC = x"], "Line"),
            "2": row("GeoQA+", "As shown in the figure, AB is parallel to CD and angle 1 = 130.0, then angle 2 is ()",
                     ["40°", "50°", "60°", "70°"], 50.0, "geoqa_2.png", shape="Angle"),
            "3": row("MathQA", "the side of a square is 4 cm . what is its area ?", ["8", "16", "12", "20"], "16",
                     shape="Quad"),
            "4": row("MATH-Geometry", "A right isosceles triangle has legs of length 4. How long is its hypotenuse?",
                     None, "4\\sqrt{2}", shape="Triangle"),
            "5": row("UniGeo", "In triangle ABC, angle C = 90.0, angle A = 30.0, AB = 4.62, find BC.",
                     ["1.15", "2.31", "3.46", "4.62"], 2.31, "unigeo_5.png", shape="Triangle"),
        },
        "aug.json": {
            "1": row("PGPS9K", "Find x.", ["5", "7.5", "10", "12.5"], "7.5", "pgps_1.png", ["line A B C"],
                     ["AB = 5", "BC = x"], "Line", aug_problem="Determine the value of x shown in the figure."),
        },
        "backward_aug.json": {
            "1": row("PGPS9K", "Find x.", ["5", "7.5", "10", "12.5"], "7.5", "pgps_1.png", ["line A B C"],
                     ["AB = 5", "BC = x"], "Line", backward_semantic=["AB = x", "BC = 2.5"],
                     backward_text="Find AC. The correct answer is 7.5. Now please answer what is the value of x?",
                     backward_answer_value="5"),
        },
        "solid.json": {
            "1": row(None, "As shown in the figure, the edge of the cube is 2. What is the sum of its edges?",
                     ["8", "24", "16", "12"], "B", "solid_1.png", shape="Cube"),
        },
    }
    for file, rows in subsets.items():
        with open(os.path.join(folder, "dataset_merge", file), "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=2)


def _geoqa(root: str) -> None:
    folder = os.path.join(root, "GeoQA")
    os.makedirs(os.path.join(folder, "Geo170K", "images", "test"), exist_ok=True)
    rows = [("As shown in the figure, angle A = 80.0, angle B = 60.0, DE parallel BC, then angle CED is ()", "140°"),
            ("As shown in the figure, BC = 5.0, BF = 7.0, then the length of EC is ()", "3cm"),
            ("The street lamps are 30.0 apart and Xiaogang is 1.5 tall. The lamp is ()", "9米")]
    with open(os.path.join(folder, "geoqa_test_prompts.jsonl"), "w", encoding="utf-8") as f:
        for i, (question, answer) in enumerate(rows):
            _picture(f"G {i}", "black").save(os.path.join(folder, "Geo170K", "images", "test", f"{i}.png"))
            f.write(json.dumps({"image_path": f"./Geo170K/images/test/{i}.png", "question": question,
                                "ground_truth": answer}) + "\n")


def _scienceqa(root: str) -> None:
    from datasets import Image as HFImage, Sequence, Value

    def row(question, choices, answer, hint, subject, grade):
        return dict(image=_picture("sci", "teal"), question=question, choices=choices, answer=answer, hint=hint,
                    task="closed choice", grade=grade, subject=subject, topic="fixture", category="fixture",
                    skill="fixture", lecture="", solution="")

    rows = [row("Which animal's feet are adapted for swimming?", ["duck", "cat"], 0,
                "Look at the picture of the feet.", "natural science", "grade3"),
            row("Which state is highlighted?", ["Ohio", "Utah", "Iowa"], 2, "", "social science", "grade4"),
            row("Which word does not rhyme?", ["bake", "cake", "dog"], 2, "", "language science", "grade8")]
    features = {"image": HFImage(), "question": Value("string"), "choices": Sequence(Value("string")),
                "answer": Value("int8"), "hint": Value("string"), "task": Value("string"), "grade": Value("string"),
                "subject": Value("string"), "topic": Value("string"), "category": Value("string"),
                "skill": Value("string"), "lecture": Value("string"), "solution": Value("string")}
    _parquet(rows, features, os.path.join(root, "ScienceQA", "ScienceQA-IMG", "test-00000-of-00001.parquet"))


WRITERS = {"mathvista": _mathvista, "mathverse": _mathverse, "mathvision": _mathvision, "mmmu": _mmmu,
           "wemath": _wemath, "geoeval": _geoeval, "geometry3k": _geometry3k, "geoqa": _geoqa,
           "scienceqa": _scienceqa}


def write_fixtures(folder: str, names: list[str] | None = None) -> str:
    """Write the fixture copies of `names` (default: every benchmark) under `folder`; returns `folder`."""
    for name in names or list(WRITERS):
        WRITERS[name](folder)
    return folder
