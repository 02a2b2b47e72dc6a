"""Windows into the forward pass, for learners: `python -m minislm tokenize | trace |
lens | attention | rope | routing | explain | explore`.

Each command is one module here that asks the model's recorder (`minislm.trace`)
for what it shows and prints it as text; `plots` draws the same as a picture when
matplotlib is installed, and `explain` writes everything into one HTML page.
`explore` serves a live page (explore.py, the HTTP side; session.py, generation step
by step with a recorder riding along; arithmetic.py, one head's attention in numbers);
both pages draw with views.js. Nothing here is imported by the forward pass.
"""
