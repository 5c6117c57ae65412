"""
Generate the small chat dataset that loranotes ships as its default input.

The rows follow the HuggingFaceH4/ultrachat_200k schema:

    {"prompt": str, "prompt_id": sha256(prompt), "messages": [{"role", "content"}, ...]}

Nothing is downloaded or copied: every conversation is assembled from the
hand-written knowledge table below (topics across several domains, each with a
few facts, tips, an example and a comparison) plus question, answer and
follow-up templates. A seeded random.Random picks topics, templates and turn
counts, so the same (n, seed) always gives byte-identical output.

Used by Snakemake's script directive (main) or directly:

    python scripts/bundled_sample.py OUT.jsonl [--n 400] [--seed 0]
"""

import argparse
import hashlib
import json
import random
from pathlib import Path

# -----------------------------------------------------------------------------
# knowledge table: one dict per topic
#   name      noun phrase that reads well after "What is ..." / "tips about ..."
#   practical whether "give me tips" is a natural thing to ask
#   facts     2-3 short factual sentences, the core of an explanation
#   why       one sentence on why the topic matters
#   points    3-4 tips (practical) or key points (otherwise), for list answers
#   example   a concrete example, one or two sentences
#   contrast  (related thing, how the topic differs from it)
#   code      optional (language, snippet), shown inside a markdown fence

TOPICS = [
    # --- machine learning
    dict(
        name="contrastive learning", domain="machine learning", practical=True,
        facts=[
            "Contrastive learning trains a model to pull the representations of related examples together and push unrelated ones apart.",
            "The related pairs often come for free, such as two augmented crops of the same photo or an image and its caption.",
            "The other items in the batch usually serve as the negatives, which is why large batches tend to help.",
        ],
        why="It lets a model learn useful features from huge amounts of unlabeled data, which is far cheaper than hand labeling.",
        points=[
            "Use strong, varied augmentations so the model cannot match pairs by trivial cues.",
            "Tune the temperature, because it controls how hard the loss focuses on difficult negatives.",
            "Use batches that are as large as your memory allows, since every other item acts as a negative.",
            "Evaluate with a simple linear probe to check the learned features are actually useful.",
        ],
        example="CLIP learns to match each image with its own caption among thousands of other captions in the same batch, and its features transfer to many vision tasks.",
        contrast=("supervised classification", "Supervised classification needs a human label for every example and learns to predict that label. Contrastive learning only needs to know which examples belong together, so the signal comes from the structure of the data."),
    ),
    dict(
        name="LoRA", domain="machine learning", practical=True,
        facts=[
            "LoRA, short for low-rank adaptation, fine-tunes a large model by freezing its weights and training small extra matrices instead.",
            "Each adapted weight gets an update written as the product of two thin matrices, so only a tiny fraction of parameters is trained.",
            "After training, the update can be merged back into the original weights, so inference costs nothing extra.",
        ],
        why="It makes fine-tuning large models possible on a single GPU and lets you keep many small adapters instead of many full model copies.",
        points=[
            "Start with a small rank such as 8 or 16 and only increase it if the model underfits.",
            "Apply LoRA to the attention projections first, since that is where it usually helps most.",
            "Use a higher learning rate than for full fine-tuning, because the adapter starts from zero.",
            "Save only the adapter weights, which are often just a few megabytes.",
        ],
        example="You could take a 7-billion-parameter chat model, add rank-16 adapters to its query and value projections, and train fewer than 1 percent of its parameters on your own support tickets.",
        contrast=("full fine-tuning", "Full fine-tuning updates every weight and needs memory for all of their gradients and optimizer states. LoRA trains only the small adapter matrices, so it is much cheaper, usually at a small cost in final quality."),
    ),
    dict(
        name="quantization", domain="machine learning", practical=True,
        facts=[
            "Quantization stores a model's weights, and sometimes its activations, with fewer bits, for example 8-bit or 4-bit integers instead of 16-bit floats.",
            "Each group of values shares a scale factor, so the small integers can be mapped back to approximately the original numbers.",
            "The model gets smaller and often faster, at the price of a little rounding error.",
        ],
        why="It lets large models run on cheaper hardware, including laptops and phones, and reduces the memory traffic that often limits speed.",
        points=[
            "Measure quality on your own task before and after, because average benchmarks can hide regressions.",
            "Try 8-bit first, since it is nearly lossless for most models, and go to 4-bit only if you need the memory.",
            "Keep sensitive layers such as the embeddings or the output head in higher precision if quality drops.",
        ],
        example="A 7-billion-parameter model needs about 14 GB in 16-bit floats but only around 4 GB when its weights are stored in 4-bit form.",
        contrast=("pruning", "Pruning removes weights entirely, setting them to zero. Quantization keeps every weight but stores each one with less precision."),
    ),
    dict(
        name="overfitting", domain="machine learning", practical=True,
        facts=[
            "Overfitting happens when a model learns the training data so closely, noise included, that it performs worse on new data.",
            "The classic sign is a training loss that keeps falling while the validation loss starts to rise.",
            "It is most likely when the model is large compared to the amount of training data.",
        ],
        why="A model is only useful if it generalizes, so a great training score means little if it does not carry over to real inputs.",
        points=[
            "Always keep a validation set that the model never trains on.",
            "Stop training when the validation loss stops improving.",
            "Use regularization such as dropout or weight decay.",
            "Collect more data or use data augmentation when you can.",
        ],
        example="A student who memorizes last year's exam answers word for word may ace a practice test built from that exam but fail when the questions are reworded.",
        contrast=("underfitting", "Underfitting is the opposite problem: the model is too simple or trained too briefly, so it does poorly even on the training data. Overfitting does well on training data and poorly on new data."),
    ),
    dict(
        name="gradient descent", domain="machine learning", practical=True,
        facts=[
            "Gradient descent is an optimization method that repeatedly nudges a model's parameters in the direction that lowers the loss.",
            "The gradient tells you which way the loss increases fastest, so you take a small step the opposite way.",
            "The size of each step is set by the learning rate.",
        ],
        why="Almost every neural network is trained with some version of it, so understanding it explains most of what happens during training.",
        points=[
            "If the loss explodes, lower the learning rate.",
            "Use mini-batches, which make each step cheap and add helpful noise.",
            "Try an adaptive optimizer such as Adam when plain gradient descent is slow.",
        ],
        example="Fitting a line y = w * x starts from a guess for w, measures how wrong the predictions are, and moves w a little in the direction that reduces that error.",
        contrast=("Newton's method", "Newton's method also uses second derivatives to jump more directly to a minimum, but computing them is far too expensive for large models. Gradient descent only needs first derivatives, so it scales to billions of parameters."),
        code=("python", "w, lr = 0.0, 0.1\nxs, ys = [1, 2, 3], [2, 4, 6]\nfor step in range(100):\n    grad = sum(2 * (w * x - y) * x for x, y in zip(xs, ys)) / len(xs)\n    w -= lr * grad\nprint(round(w, 3))  # close to 2.0"),
    ),
    dict(
        name="attention", domain="machine learning", practical=False,
        facts=[
            "Attention lets each position in a sequence look at every other position and decide how much to use from each.",
            "Every token produces a query, a key and a value, and the match between queries and keys sets the weights on the values.",
            "Transformers stack many attention layers, each with several heads that can focus on different relationships.",
        ],
        why="It lets models connect words that are far apart in a text, which older recurrent networks struggled to do.",
        points=[
            "Attention weights for each query sum to one, so they act like a soft lookup.",
            "Its cost grows with the square of the sequence length, which is why long contexts are expensive.",
            "Causal masking stops a language model from attending to future tokens.",
        ],
        example="In the sentence 'The cat sat on the mat because it was tired', attention helps the model link 'it' back to 'cat' rather than 'mat'.",
        contrast=("a recurrent network", "A recurrent network reads tokens one at a time and squeezes the past into a single hidden state. Attention looks at all positions directly, which is easier to parallelize and keeps distant information sharp."),
    ),
    dict(
        name="tokenization", domain="machine learning", practical=True,
        facts=[
            "Tokenization splits text into the units a language model actually sees, usually pieces of words called subwords.",
            "Common words become a single token, while rare words are broken into several smaller pieces.",
            "Methods such as byte-pair encoding learn the vocabulary by repeatedly merging the most frequent pairs of symbols.",
        ],
        why="The tokenizer decides how long every input is and what the model can represent, so it affects both cost and quality.",
        points=[
            "Check how your tokenizer splits domain words, numbers and code before you train.",
            "Always use the same tokenizer at training and inference time.",
            "Remember that context limits are counted in tokens, not words.",
        ],
        example="A subword tokenizer might split 'unbelievably' into 'un', 'believ' and 'ably', while 'the' stays a single token.",
        contrast=("splitting on spaces", "Splitting on spaces gives a huge vocabulary and no way to handle unseen words. Subword tokenization keeps the vocabulary fixed and can still spell out any new word from smaller pieces."),
    ),
    # --- cooking
    dict(
        name="the Maillard reaction", domain="cooking", practical=True,
        facts=[
            "The Maillard reaction is the browning that happens when proteins and sugars react under high heat.",
            "It starts to run quickly at around 140 to 165 degrees Celsius and creates hundreds of new flavor compounds.",
            "It is responsible for the crust on bread, the sear on a steak and the taste of roasted coffee.",
        ],
        why="Browning is one of the biggest sources of savory flavor in cooking, so controlling it makes simple food taste much better.",
        points=[
            "Pat meat and vegetables dry, because surface water keeps the temperature too low to brown.",
            "Do not crowd the pan, or the food will steam instead of sear.",
            "Let the pan get properly hot before the food goes in.",
        ],
        example="Searing mushrooms in a hot, uncrowded pan turns them deep brown and savory, while piling them into a cold pan leaves them gray and watery.",
        contrast=("caramelization", "Caramelization is the browning of sugar on its own and needs higher temperatures. The Maillard reaction needs both proteins and sugars, which is why it gives meatier, more savory flavors."),
    ),
    dict(
        name="sourdough baking", domain="cooking", practical=True,
        facts=[
            "Sourdough bread rises thanks to a starter, a culture of wild yeast and lactic acid bacteria kept alive with regular feedings of flour and water.",
            "The bacteria produce acids that give the bread its tang and help it keep longer.",
            "Fermentation is slow, so a loaf often takes a day or more from mixing to baking.",
        ],
        why="The long fermentation develops flavor and texture that quick commercial yeast breads rarely match.",
        points=[
            "Feed your starter at the same time each day and use it when it has roughly doubled.",
            "Judge the dough by how it looks and feels, not only by the clock.",
            "Bake in a preheated covered pot so the trapped steam helps the loaf rise.",
        ],
        example="A typical schedule is to mix the dough in the morning, stretch and fold it a few times, shape it in the evening, rest it in the fridge overnight and bake it the next morning.",
        contrast=("baking with instant yeast", "Instant yeast is a single strain that works fast and predictably, so bread can be ready in a few hours. A sourdough starter is slower and less predictable, but its bacteria add sourness and depth."),
    ),
    dict(
        name="braising", domain="cooking", practical=True,
        facts=[
            "Braising is a cooking method where food is browned first and then cooked slowly in a small amount of liquid in a covered pot.",
            "The gentle, moist heat turns the tough connective tissue in cuts like beef chuck into gelatin.",
            "The cooking liquid becomes a rich sauce by the end.",
        ],
        why="It turns cheap, tough cuts of meat into tender meals with very little active work.",
        points=[
            "Brown the meat well first for deeper flavor.",
            "Keep the liquid at a gentle simmer, never a rolling boil.",
            "Make it a day ahead if you can, because braises often taste better reheated.",
        ],
        example="Beef short ribs browned in a pot, then covered halfway with stock and wine and cooked in a low oven for three hours, become tender enough to cut with a spoon.",
        contrast=("stewing", "Stewing usually uses smaller pieces fully covered in liquid. Braising uses larger pieces partly covered, so the top can stay browned while the bottom simmers."),
    ),
    dict(
        name="emulsification", domain="cooking", practical=True,
        facts=[
            "Emulsification is the process of mixing two liquids that normally separate, such as oil and vinegar, into a smooth sauce.",
            "One liquid is broken into tiny droplets that stay suspended in the other.",
            "Emulsifiers like egg yolk or mustard coat the droplets and keep them from merging again.",
        ],
        why="Many classic sauces, from mayonnaise to vinaigrette to hollandaise, depend on a stable emulsion.",
        points=[
            "Add the oil slowly at first, especially for mayonnaise.",
            "Whisk in a spoonful of mustard to stabilize a vinaigrette.",
            "If a sauce breaks, whisk it slowly into a fresh egg yolk or a splash of warm water to bring it back.",
        ],
        example="Mayonnaise is oil whisked drop by drop into egg yolk, where the lecithin in the yolk holds billions of oil droplets in place.",
        contrast=("dissolving", "When something dissolves, like salt in water, it mixes at the level of single molecules. An emulsion only spreads one liquid as tiny droplets through another, so it can separate again."),
    ),
    # --- geography
    dict(
        name="plate tectonics", domain="geography", practical=False,
        facts=[
            "Plate tectonics is the theory that Earth's outer shell is broken into large plates that move slowly over the mantle.",
            "The plates move a few centimeters per year, about as fast as fingernails grow.",
            "Most earthquakes, volcanoes and mountain ranges form where plates meet.",
        ],
        why="It explains where natural hazards happen and how continents and oceans took their current shapes.",
        points=[
            "At divergent boundaries plates move apart and new crust forms, as in the mid-Atlantic ridge.",
            "At convergent boundaries plates collide, building mountains or pushing one plate under another.",
            "At transform boundaries plates slide past each other, as along the San Andreas Fault.",
        ],
        example="The Himalayas are still rising because the Indian plate keeps pushing north into the Eurasian plate.",
        contrast=("continental drift", "Continental drift was the earlier idea that continents move, but it lacked a mechanism. Plate tectonics added one, with whole plates carried along by the spreading sea floor and mantle convection."),
    ),
    dict(
        name="the water cycle", domain="geography", practical=False,
        facts=[
            "The water cycle describes how water moves between the oceans, the air and the land.",
            "Sunlight evaporates water, the vapor cools and condenses into clouds, and it falls again as rain or snow.",
            "Water then flows back to the sea through rivers and groundwater, or evaporates again.",
        ],
        why="It delivers the fresh water that all land life depends on and moves large amounts of heat around the planet.",
        points=[
            "About 97 percent of Earth's water is salty ocean water.",
            "Plants return a lot of water to the air through transpiration.",
            "Water can stay in deep groundwater or ice sheets for thousands of years.",
        ],
        example="A puddle that disappears on a sunny afternoon has evaporated, and that same water may later fall as rain hundreds of kilometers away.",
        contrast=("the carbon cycle", "The carbon cycle tracks carbon moving between living things, rocks, oceans and air. The water cycle tracks water, and it is driven mostly by evaporation and gravity rather than by biology."),
    ),
    dict(
        name="the monsoon", domain="geography", practical=False,
        facts=[
            "A monsoon is a seasonal reversal of wind that brings a long rainy season to a region.",
            "In summer, land heats up faster than the ocean, so moist air flows inland and rises, dropping heavy rain.",
            "The South Asian monsoon is the best known and brings most of India's yearly rainfall in a few months.",
        ],
        why="Hundreds of millions of farmers depend on the monsoon rains, so a late or weak monsoon can hurt harvests and economies.",
        points=[
            "Monsoon winds reverse direction between summer and winter.",
            "The timing of the onset varies from year to year and is closely forecast.",
            "Monsoons also occur in West Africa, East Asia and northern Australia.",
        ],
        example="In Mumbai, the summer monsoon usually arrives in early June and can bring more rain in a single month than some European cities get in a year.",
        contrast=("an ordinary rainy day", "A rainy day comes from a passing weather system and lasts hours or days. A monsoon is a large-scale seasonal shift in the winds that sets the rain pattern for months."),
    ),
    # --- history
    dict(
        name="the printing press", domain="history", practical=False,
        facts=[
            "Johannes Gutenberg developed a printing press with movable metal type in Mainz around 1450.",
            "Reusable type and oil-based ink made it possible to print many identical copies quickly and cheaply.",
            "Within fifty years, presses in hundreds of European towns had produced millions of books.",
        ],
        why="Cheap books spread literacy and new ideas quickly, helping to drive the Reformation and the Scientific Revolution.",
        points=[
            "Before the press, books in Europe were mostly copied by hand.",
            "Movable type had already been invented earlier in China and Korea.",
            "Printing helped standardize spelling and languages.",
        ],
        example="The Gutenberg Bible, printed in the 1450s, is one of the first major books made with movable metal type in Europe.",
        contrast=("hand copying by scribes", "A scribe could take months to copy a single book, and every copy could contain new mistakes. A press could produce hundreds of identical pages a day."),
    ),
    dict(
        name="the Silk Road", domain="history", practical=False,
        facts=[
            "The Silk Road was a network of trade routes linking China with Central Asia, the Middle East and Europe.",
            "It was active for well over a thousand years, from around the second century BCE.",
            "Merchants traded silk, spices, horses and paper, and most goods passed through many hands along the way.",
        ],
        why="Besides goods, it carried religions, technologies and diseases, shaping cultures across Eurasia.",
        points=[
            "It was not a single road but many overland and sea routes.",
            "Buddhism spread from India into China partly along these routes.",
            "Caravan cities such as Samarkand grew rich from the trade.",
        ],
        example="Papermaking moved west along these routes from China to the Islamic world, and from there to Europe.",
        contrast=("modern global trade", "Modern trade ships goods directly across the world in weeks. Silk Road goods moved slowly in stages, with each merchant covering only part of the journey."),
    ),
    dict(
        name="the French Revolution", domain="history", practical=False,
        facts=[
            "The French Revolution began in 1789 and overthrew the absolute monarchy in France.",
            "It was fueled by a financial crisis, food shortages and resentment of the privileges of the nobility and clergy.",
            "It went through radical phases, including the Reign of Terror, before Napoleon took power in 1799.",
        ],
        why="It spread ideas of citizenship, equal rights and popular sovereignty that still shape modern politics.",
        points=[
            "The storming of the Bastille on 14 July 1789 became its symbol.",
            "The Declaration of the Rights of Man and of the Citizen set out its key principles.",
            "King Louis XVI was executed in 1793.",
        ],
        example="The metric system is a lasting practical legacy, introduced by revolutionary France to replace a confusing mix of local units.",
        contrast=("the American Revolution", "The American Revolution was mainly a war for independence from a distant power. The French Revolution tried to rebuild society at home, overturning the monarchy, the church's privileges and the old class order."),
    ),
    dict(
        name="the Industrial Revolution", domain="history", practical=False,
        facts=[
            "The Industrial Revolution was the shift from hand production to machines and factories, starting in Britain around 1760.",
            "Steam engines, powered by coal, drove factories, railways and ships.",
            "Many people moved from farms to fast-growing cities to work in mills and workshops.",
        ],
        why="It began the long rise in productivity and living standards that defines the modern world, along with new social problems.",
        points=[
            "Textiles were the first industry to be mechanized.",
            "Early factory work involved long hours and child labor.",
            "It spread to Europe, the United States and later the rest of the world.",
        ],
        example="The spinning jenny let one worker spin many threads at once, and before long water- and steam-powered mills were doing the work of hundreds of spinners.",
        contrast=("the digital revolution", "The Industrial Revolution replaced muscle power with machines. The digital revolution automates information work, replacing paper and routine mental tasks with computers."),
    ),
    # --- programming
    dict(
        name="recursion", domain="programming", practical=True,
        facts=[
            "Recursion is when a function solves a problem by calling itself on a smaller version of the same problem.",
            "Every recursive function needs a base case that stops the calls, or it will run forever.",
            "It is a natural fit for tree-shaped data such as folders, parse trees and nested lists.",
        ],
        why="Many problems are much easier to express recursively, and understanding it is key to algorithms like quicksort and tree traversals.",
        points=[
            "Write the base case first.",
            "Make sure every call moves closer to the base case.",
            "Watch the recursion depth, since Python stops at around a thousand nested calls by default.",
        ],
        example="Computing a factorial is the classic example: the factorial of n is n times the factorial of n minus one, and the factorial of 0 is 1.",
        contrast=("a loop", "A loop repeats steps while updating variables in place. Recursion repeats by calling the function again, which uses a new stack frame each time but often mirrors the structure of the problem more directly."),
        code=("python", "def factorial(n):\n    if n == 0:  # base case\n        return 1\n    return n * factorial(n - 1)\n\nprint(factorial(5))  # 120"),
    ),
    dict(
        name="list comprehension in Python", domain="programming", practical=True,
        facts=[
            "A list comprehension builds a new list from an existing sequence in a single expression.",
            "It combines a loop, an optional filter and a transformation, for example squaring only the even numbers.",
            "It is usually shorter and a bit faster than the same loop with append.",
        ],
        why="It is one of the most common Python idioms, so knowing it makes other people's code much easier to read.",
        points=[
            "Keep comprehensions short, and switch to a normal loop if they need more than one condition.",
            "Use a generator expression in parentheses when you only need to iterate once.",
            "Dictionary and set comprehensions use the same syntax with braces.",
        ],
        example="Turning a list of words into their lengths takes a single line, and adding an if clause can keep only the long words.",
        contrast=("the map function", "map applies a function to every item and returns an iterator. A comprehension can apply any expression and filter items at the same time, which many people find more readable."),
        code=("python", "words = [\"tree\", \"notebook\", \"sky\", \"gradient\"]\nlengths = [len(w) for w in words]\nlong_words = [w for w in words if len(w) > 4]\nprint(lengths, long_words)"),
    ),
    dict(
        name="hashing", domain="programming", practical=True,
        facts=[
            "Hashing turns a key, such as a string, into a number that decides where the value is stored in a table.",
            "Hash tables like Python's dict use it to find values in roughly constant time, no matter how many items there are.",
            "Two keys can collide on the same slot, so the table needs a rule for resolving collisions.",
        ],
        why="Fast lookups by key are everywhere, from caches and databases to counting words in a document.",
        points=[
            "Use a dict or set whenever you repeatedly check whether something is present.",
            "Only use immutable values, such as strings and tuples, as keys.",
            "Do not rely on the hash value of a string staying the same between Python runs.",
        ],
        example="Counting how often each word appears in a book is a single pass with a dictionary, instead of searching a list again for every word.",
        contrast=("searching a list", "Checking whether an item is in a list means scanning it, which gets slower as the list grows. A hash table jumps almost straight to the right slot, so the lookup stays fast."),
        code=("python", "counts = {}\nfor word in \"the cat and the hat\".split():\n    counts[word] = counts.get(word, 0) + 1\nprint(counts)  # {'the': 2, 'cat': 1, 'and': 1, 'hat': 1}"),
    ),
    dict(
        name="git branching", domain="programming", practical=True,
        facts=[
            "A git branch is a movable pointer to a commit, which lets you develop a change separately from the main line of work.",
            "Creating a branch is cheap, so it is common to make one for every feature or bug fix.",
            "When the work is done, the branch is merged back or rebased onto the main branch.",
        ],
        why="Branches let several people work on different changes at once without breaking each other's code.",
        points=[
            "Keep branches short-lived so they do not drift far from main.",
            "Give branches descriptive names such as fix-login-timeout.",
            "Pull the latest main often to catch conflicts early.",
        ],
        example="You might create a branch for a new search feature, commit to it for two days, open a pull request and merge it once a teammate has reviewed it.",
        contrast=("copying the project folder", "Copying a folder duplicates every file and makes combining changes a manual mess. A branch shares history with main, so git can show exactly what changed and merge it automatically."),
        code=("bash", "git switch -c add-search\n# edit files, then\ngit commit -am \"Add search box\"\ngit switch main\ngit merge add-search"),
    ),
    dict(
        name="unit testing", domain="programming", practical=True,
        facts=[
            "Unit testing means writing small automated checks that each verify one piece of code, such as a single function.",
            "Tests run in seconds, so you can rerun them after every change.",
            "A failing test points directly at the behavior that broke.",
        ],
        why="Good tests let you change code with confidence, because they catch regressions before users do.",
        points=[
            "Test behavior, not implementation details, so refactoring does not break the tests.",
            "Include edge cases such as empty inputs and boundary values.",
            "Make sure each test can actually fail, for example by breaking the code once on purpose.",
        ],
        example="For a function that splits a bill among friends, you would test a normal case, a single person, and an amount that does not divide evenly.",
        contrast=("integration testing", "Integration tests check that several parts work together, such as code plus a real database. Unit tests isolate one piece, which makes them faster and makes failures easier to locate."),
        code=("python", "def split_bill(total, people):\n    return round(total / people, 2)\n\ndef test_split_bill():\n    assert split_bill(90, 3) == 30.0\n    assert split_bill(10, 3) == 3.33"),
    ),
    # --- health and fitness
    dict(
        name="progressive overload", domain="health and fitness", practical=True,
        facts=[
            "Progressive overload is the principle of gradually increasing the demands on your muscles so they keep adapting.",
            "You can add weight, repetitions, sets or slow the movement down.",
            "Without a growing challenge, strength and muscle gains tend to stall after a few weeks.",
        ],
        why="It is the core idea behind almost every effective strength training program.",
        points=[
            "Increase the load in small steps, for example 2 to 5 percent at a time.",
            "Keep a training log so you know what to beat next session.",
            "Never trade good form for more weight.",
        ],
        example="If you can do three sets of eight squats at 60 kilograms, you might aim for three sets of ten, then move to 62.5 kilograms and start again at eight.",
        contrast=("simply exercising more often", "Training more often adds volume but not necessarily challenge. Progressive overload is about making each session slightly harder than the last, whether or not you train more often."),
    ),
    dict(
        name="sleep hygiene", domain="health and fitness", practical=True,
        facts=[
            "Sleep hygiene is the set of habits and surroundings that make good sleep more likely.",
            "Most adults need about seven to nine hours of sleep a night.",
            "A regular schedule, a dark cool room and less caffeine late in the day all make a difference.",
        ],
        why="Poor sleep affects mood, memory, appetite and long-term health, and better habits are a cheap first fix.",
        points=[
            "Go to bed and wake up at the same time every day, including weekends.",
            "Avoid caffeine after early afternoon.",
            "Keep screens out of bed and dim the lights in the last hour before sleep.",
            "Get bright daylight in the morning to set your body clock.",
        ],
        example="Someone who scrolls on a phone in bed until 1 a.m. and sleeps late on weekends might feel much better after a fixed 11 p.m. bedtime and a 7 a.m. alarm every day.",
        contrast=("taking sleeping pills", "Sleeping pills can help in the short term but do not fix the underlying habits and can cause side effects. Sleep hygiene changes the habits themselves and is usually tried first."),
    ),
    dict(
        name="interval training", domain="health and fitness", practical=True,
        facts=[
            "Interval training alternates short bursts of hard effort with periods of easier recovery.",
            "High-intensity intervals can improve fitness in less total time than steady exercise.",
            "It works with running, cycling, rowing, swimming or bodyweight exercises.",
        ],
        why="It is an efficient way to improve heart and lung fitness for people who are short on time.",
        points=[
            "Warm up for at least five minutes before the first hard interval.",
            "Start with one or two interval sessions a week and build up.",
            "Keep the hard parts truly hard and the easy parts truly easy.",
        ],
        example="A simple session is eight rounds of 30 seconds fast cycling followed by 90 seconds of easy pedaling.",
        contrast=("steady-state cardio", "Steady-state cardio keeps a moderate pace for a long stretch, which is gentle and builds endurance. Intervals push much harder for short bursts, which is more demanding but more time-efficient."),
    ),
    # --- personal finance
    dict(
        name="compound interest", domain="personal finance", practical=True,
        facts=[
            "Compound interest means you earn interest not only on your original money but also on the interest it has already earned.",
            "Over long periods this makes savings grow faster and faster.",
            "The same effect works against you on debts such as credit card balances.",
        ],
        why="It is the main reason starting to save early matters so much, and why high-interest debt is dangerous.",
        points=[
            "Start saving early, even in small amounts, because time does most of the work.",
            "Pay off high-interest debt before investing.",
            "Use the rule of 72: divide 72 by the yearly rate to estimate how many years it takes to double your money.",
        ],
        example="1,000 dollars at 7 percent a year grows to about 1,967 dollars after 10 years and about 7,612 dollars after 30 years, without adding anything.",
        contrast=("simple interest", "Simple interest is paid only on the original amount, so it grows in a straight line. Compound interest is paid on the growing balance, so it grows exponentially."),
    ),
    dict(
        name="an emergency fund", domain="personal finance", practical=True,
        facts=[
            "An emergency fund is money set aside only for unexpected costs such as job loss, medical bills or car repairs.",
            "A common target is three to six months of essential expenses.",
            "It should be kept somewhere safe and easy to reach, such as a savings account.",
        ],
        why="Without one, a surprise bill often ends up on a credit card, where interest makes it much more expensive.",
        points=[
            "Start with a small goal, such as one month of rent.",
            "Set up an automatic transfer on payday.",
            "Keep it in a separate account so you are not tempted to spend it.",
        ],
        example="If your rent, food, transport and bills add up to 2,000 dollars a month, a fund of 6,000 to 12,000 dollars would cover three to six months.",
        contrast=("investing in the stock market", "Investments can grow more over time but can also fall just when you need the money. An emergency fund is about safety and quick access, not growth."),
    ),
    dict(
        name="index fund investing", domain="personal finance", practical=True,
        facts=[
            "An index fund holds all the stocks in a market index, such as the S&P 500, instead of trying to pick winners.",
            "Because nobody is paid to pick stocks, the fees are usually very low.",
            "Over long periods, most actively managed funds fail to beat their index after fees.",
        ],
        why="It gives ordinary savers cheap, broad diversification with very little effort.",
        points=[
            "Compare expense ratios, since small fee differences add up over decades.",
            "Invest regularly rather than trying to time the market.",
            "Only invest money you will not need for at least five years.",
        ],
        example="Buying one share of an S&P 500 index fund gives you a tiny slice of about 500 large American companies at once.",
        contrast=("picking individual stocks", "Picking stocks concentrates your money in a few companies and takes research and luck. An index fund spreads it across the whole market and accepts the market's average return."),
    ),
    # --- physics
    dict(
        name="Newton's third law", domain="physics", practical=False,
        facts=[
            "Newton's third law says that whenever one object pushes on another, the second pushes back with an equal force in the opposite direction.",
            "The two forces act on different objects, which is why they do not cancel out.",
            "It is often summed up as: for every action there is an equal and opposite reaction.",
        ],
        why="It explains how anything moves itself, from walking and swimming to rockets in space.",
        points=[
            "The paired forces are always of the same type, for example both gravitational.",
            "Equal forces can still produce very different accelerations if the masses differ.",
            "A rocket works in a vacuum because it pushes on its own exhaust, not on the air.",
        ],
        example="When you step off a small boat onto a dock, you push the boat backward while the boat pushes you forward.",
        contrast=("Newton's second law", "The second law links force, mass and acceleration for a single object: F equals m times a. The third law is about pairs of forces between two objects."),
    ),
    dict(
        name="entropy", domain="physics", practical=False,
        facts=[
            "Entropy measures how many microscopic arrangements are consistent with what we see at the large scale, often described as disorder.",
            "The second law of thermodynamics says the total entropy of an isolated system never decreases.",
            "This is why heat flows from hot objects to cold ones and not the other way by itself.",
        ],
        why="It sets hard limits on how efficient engines and refrigerators can be and explains why many processes only run one way.",
        points=[
            "Local entropy can fall, as when water freezes, if entropy increases more somewhere else.",
            "Mixed gases do not spontaneously unmix.",
            "Information theory uses a closely related idea to measure uncertainty.",
        ],
        example="An ice cube melting in a warm drink is entropy increasing: the energy spreads out, and you never see the drink spontaneously refreeze the cube.",
        contrast=("energy", "Energy is conserved, so the total amount never changes. Entropy describes how spread out that energy is, and it tends to grow over time."),
    ),
    dict(
        name="the Doppler effect", domain="physics", practical=False,
        facts=[
            "The Doppler effect is the change in frequency of a wave when the source and the observer move relative to each other.",
            "When the source approaches, the waves bunch up and the pitch sounds higher, and when it moves away the pitch drops.",
            "It applies to light as well as sound.",
        ],
        why="It is used in radar guns, medical ultrasound and astronomy, where redshift shows that distant galaxies are moving away.",
        points=[
            "The faster the relative motion, the bigger the shift.",
            "Light from receding objects shifts toward red, and from approaching ones toward blue.",
            "Weather radar uses it to measure wind speed inside storms.",
        ],
        example="An ambulance siren sounds higher as it drives toward you and suddenly lower the moment it passes.",
        contrast=("an echo", "An echo is a reflected sound that arrives late but at the same pitch. The Doppler effect changes the pitch itself because of motion."),
    ),
    # --- writing
    dict(
        name="the active voice", domain="writing", practical=True,
        facts=[
            "In the active voice, the subject of the sentence performs the action, as in 'The committee approved the plan.'",
            "In the passive voice, the subject receives the action, as in 'The plan was approved.'",
            "Active sentences are usually shorter and make clear who did what.",
        ],
        why="Clear, direct sentences are easier to read, and readers trust writing that does not hide who is responsible.",
        points=[
            "Look for forms of 'to be' followed by a past participle to spot passive sentences.",
            "Ask who did the action and make that the subject.",
            "Keep the passive when the actor is unknown or unimportant.",
        ],
        example="'Mistakes were made' becomes 'We made mistakes', which is shorter and takes responsibility.",
        contrast=("the passive voice", "The passive voice puts the action's receiver first and can leave out the actor entirely. It is not wrong, but the active voice is usually clearer and livelier."),
    ),
    dict(
        name="the topic sentence", domain="writing", practical=True,
        facts=[
            "A topic sentence states the main idea of a paragraph, usually at the very start.",
            "Every other sentence in the paragraph should support or develop that idea.",
            "Reading only the topic sentences of a good essay should give you its outline.",
        ],
        why="It tells readers what to expect, which makes long texts much easier to skim and follow.",
        points=[
            "Write one clear claim, not a vague announcement like 'This paragraph is about'.",
            "Cut or move sentences that do not support the topic sentence.",
            "Check your draft by reading the first sentence of each paragraph in order.",
        ],
        example="'Remote work saves employees an average of an hour a day' is a strong topic sentence, and the rest of the paragraph can give the evidence.",
        contrast=("a thesis statement", "A thesis statement gives the main argument of a whole essay. A topic sentence gives the main point of a single paragraph, and each one should support the thesis."),
    ),
    dict(
        name="the 'show, don't tell' principle", domain="writing", practical=True,
        facts=[
            "'Show, don't tell' is the advice to let readers experience a scene through action, detail and dialogue instead of stating conclusions.",
            "Rather than writing that a character was nervous, you describe shaking hands or a forced laugh.",
            "It engages readers by letting them draw the conclusion themselves.",
        ],
        why="Writing that shows feels vivid and believable, while too much telling can feel flat.",
        points=[
            "Replace emotion words with physical reactions or actions.",
            "Use specific sensory details rather than general ones.",
            "Still tell when you need to move quickly through unimportant time.",
        ],
        example="Instead of 'Maria was angry', you could write 'Maria slammed the laptop shut and stared at the wall without a word.'",
        contrast=("summary", "Summary compresses events and is useful for pace. Showing slows down and dramatizes the moments that matter most."),
    ),
]

# -----------------------------------------------------------------------------
# question, answer and follow-up templates

# first questions, by kind of answer they call for
QUESTIONS = {
    "explain": [
        "Can you explain {name} in simple terms?",
        "What is {name}?",
        "Could you give me an overview of {name}?",
        "What should I know about {name}?",
    ],
    "why": [
        "What is {name} and why does it matter?",
        "Why is {name} important?",
        "Why do people care so much about {name}?",
    ],
    "beginner": [
        "How would you describe {name} to a beginner?",
        "Explain {name} like I'm completely new to the subject.",
        "What's the easiest way to understand {name}?",
    ],
    "points": [
        "What are the key points to remember about {name}?",
        "List the most important things to know about {name}.",
    ],
    "tips": [
        "Give me three tips about {name}.",
        "What practical advice do you have about {name}?",
        "What are some good habits when it comes to {name}?",
    ],
}
# small variations around the first question, so prompts rarely repeat
PROMPT_OPENERS = [
    "", "", "Hi! ", "Hello. ", "Quick question. ", "I'm studying for an exam. ", "Something I've been wondering. ",
]
PROMPT_CLOSERS = [
    "", "", " I keep hearing about it.", " It came up in class today.",
    " A friend asked me and I wasn't sure.", " Thanks in advance!",
]

ANSWER_OPENERS = ["", "", "Sure! ", "Good question. ", "Happy to help. ", "Of course. "]
ANSWER_CLOSERS = [
    "", "", "", " Let me know if you'd like an example.",
    " I can go deeper into any part of this if you like.", " Feel free to ask a follow-up question.",
]
LIST_INTROS = ["Here are three {word} about {name}:", "Three {word} worth knowing about {name}:", "Sure, here are the main {word}:"]
# leads end a sentence, so the table text after them keeps its own capitals (LoRA, CLIP)
EXAMPLE_LEADS = ["Here's an example. ", "A concrete case: ", "Picture this: ", "In practice: "]
WHY_LEADS = ["Why it matters: ", "The reason people care: ", "This matters for a simple reason. "]
CONTRAST_LEADS = ["", "People often mix these up. ", "They are related but not the same. ", "The difference is worth knowing. "]
SUMMARY_LEADS = ["In one sentence: ", "Put simply: ", "The one-sentence version: "]

FOLLOW_UPS = {
    "example": [
        "Can you give an example?", "What would that look like in practice?", "Could you show me a concrete example?",
    ],
    "contrast": [
        "How is that different from {other}?", "Isn't that basically the same as {other}?", "How does it compare to {other}?",
    ],
    "summary": [
        "Summarize that in one sentence.", "Can you sum that up in a single sentence?", "What's the one-sentence version?",
    ],
    "why": ["Why does that matter, though?", "Why should I care about that?"],
    "tips": ["Any practical tips?", "What should I keep in mind?", "How do I get this right in practice?"],
    "points": ["What else should I remember about it?", "What are the key facts to keep in mind?"],
    "another": ["Thanks! One more question: {question}", "That helps, thank you. Next, {question}", "Great. Also, {question}"],
}
# what each answer kind already covers, so follow-ups don't repeat it
COVERS = {"beginner": {"beginner", "example", "why"}, "points": {"points", "tips"}, "tips": {"points", "tips"}}
# number of user turns: mostly one or two, with a healthy share of longer chats
TURN_COUNTS, TURN_WEIGHTS = [1, 2, 3, 4], [0.35, 0.3, 0.2, 0.15]

# -----------------------------------------------------------------------------
# answer builders


def lower_first(question):
    # only for our own question templates, which never start with a name
    return question[0].lower() + question[1:]


def code_block(topic):
    language, snippet = topic["code"]
    return f"```{language}\n{snippet}\n```"


def answer(rng, topic, kind, follow_up=False):
    """One assistant reply about topic, shaped by the kind of question asked."""
    name, facts = topic["name"], topic["facts"]
    if kind == "explain":
        body = " ".join(facts)
        if "code" in topic and rng.random() < 0.4:
            body += "\n\nHere is a small example:\n\n" + code_block(topic)
    elif kind == "why":
        why = rng.choice(WHY_LEADS) + topic["why"]
        if follow_up:  # the definition was already given, add a point instead
            body = why + " " + rng.choice(topic["points"])
        else:
            body = " ".join(facts[:2]) + " " + why
    elif kind == "beginner":
        body = facts[0] + " " + rng.choice(EXAMPLE_LEADS) + topic["example"] + " " + topic["why"]
    elif kind in ("points", "tips"):
        word = "tips" if kind == "tips" and topic["practical"] else "key points"
        items = rng.sample(topic["points"], 3)
        numbered = rng.random() < 0.5
        lines = [f"{i + 1}. {item}" if numbered else f"- {item}" for i, item in enumerate(items)]
        intro = rng.choice(LIST_INTROS).format(word=word, name=name)
        body = facts[0] + "\n\n" + intro + "\n\n" + "\n".join(lines)
    elif kind == "example":
        body = rng.choice(EXAMPLE_LEADS) + topic["example"]
        if "code" in topic:
            body += "\n\nIn code, it looks like this:\n\n" + code_block(topic)
        else:
            lead = " A related tip: " if topic["practical"] else " Also worth knowing: "
            body += lead + rng.choice(topic["points"])
    elif kind == "contrast":
        _, difference = topic["contrast"]
        body = rng.choice(CONTRAST_LEADS) + difference
    elif kind == "summary":
        return rng.choice(SUMMARY_LEADS) + facts[0]
    else:
        raise ValueError(f"unknown answer kind {kind!r}")
    closers = ANSWER_CLOSERS
    if kind in ("example", "beginner"):  # don't offer an example right after giving one
        closers = [c for c in ANSWER_CLOSERS if "example" not in c]
    return rng.choice(ANSWER_OPENERS) + body + rng.choice(closers)


def first_question(rng, topic):
    """Pick a first-turn question kind and wording for topic."""
    kinds = ["explain", "why", "beginner", "points"] + (["tips"] if topic["practical"] else [])
    kind = rng.choice(kinds)
    return kind, rng.choice(QUESTIONS[kind]).format(name=topic["name"])


def pick_other_topic(rng, topic):
    """Another topic for a 'one more question' turn, usually from the same domain."""
    same_domain = [t for t in TOPICS if t["domain"] == topic["domain"] and t is not topic]
    pool = same_domain if same_domain and rng.random() < 0.6 else [t for t in TOPICS if t is not topic]
    return rng.choice(pool)


def make_conversation(rng, topic, n_turns, seen_prompts):
    # first turn; retry the wording a few times so first prompts rarely repeat
    for _ in range(20):
        kind, question = first_question(rng, topic)
        prompt = rng.choice(PROMPT_OPENERS) + question + rng.choice(PROMPT_CLOSERS)
        if prompt not in seen_prompts:
            break
    seen_prompts.add(prompt)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer(rng, topic, kind)}]
    asked = {(topic["name"], k) for k in COVERS.get(kind, {kind})}  # never ask the same thing twice

    for _ in range(n_turns - 1):
        list_kind = "tips" if topic["practical"] else "points"
        options = [k for k in ("example", "contrast", "summary", "why", list_kind) if (topic["name"], k) not in asked]
        options.append("another")
        follow = rng.choice(options)
        if follow == "another":
            topic = pick_other_topic(rng, topic)
            kind, question = first_question(rng, topic)
            user = rng.choice(FOLLOW_UPS["another"]).format(question=lower_first(question))
            reply = answer(rng, topic, kind)
        else:
            kind = follow
            user = rng.choice(FOLLOW_UPS[follow]).format(other=topic["contrast"][0])
            reply = answer(rng, topic, kind, follow_up=True)
        asked |= {(topic["name"], k) for k in COVERS.get(kind, {kind})}
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": reply})
    return messages


def make_conversations(n: int = 400, seed: int = 0) -> list[dict]:
    """n conversations in the ultrachat_200k schema, fully determined by (n, seed)."""
    rng = random.Random(seed)
    rows, seen_prompts, deck = [], set(), []
    for _ in range(n):
        # deal topics from a shuffled deck so every topic shows up evenly
        if not deck:
            deck = list(TOPICS)
            rng.shuffle(deck)
        topic = deck.pop()
        n_turns = rng.choices(TURN_COUNTS, weights=TURN_WEIGHTS)[0]
        messages = make_conversation(rng, topic, n_turns, seen_prompts)
        prompt = messages[0]["content"]
        rows.append({
            "prompt": prompt,
            "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
            "messages": messages,
        })
    return rows


# -----------------------------------------------------------------------------
# entry points


def write_jsonl(rows, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(snakemake):
    rows = make_conversations(n=int(snakemake.params.n), seed=int(snakemake.params.seed))
    write_jsonl(rows, snakemake.output[0])


def cli():
    parser = argparse.ArgumentParser(description="Write the bundled UltraChat-format sample as JSON lines.")
    parser.add_argument("out", help="output .jsonl path")
    parser.add_argument("--n", type=int, default=400, help="number of conversations")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()
    write_jsonl(make_conversations(n=args.n, seed=args.seed), args.out)


if __name__ == "__main__":
    if "snakemake" in globals():
        main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
    else:
        cli()
