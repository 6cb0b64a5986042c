#!/usr/bin/env python3
"""Deterministic generator of a synthetic, TinyStories-like English corpus.

The documents are short children's stories assembled from a small grammar
(characters, places, objects, actions, feelings, simple dialogue).  The text is
deliberately simple and repetitive in structure so that a tiny language model's
loss drops quickly, yet varied enough (hundreds of names / nouns / verbs /
adjectives, many sentence templates, several plot types) that documents never
collide by accident.  Pure Python standard library (pyarrow only for
``--format parquet``).

Library use::

    from make_corpus import generate_documents
    docs = generate_documents(1000, seed=0)   # list[str], deterministic

CLI::

    python examples/make_corpus.py OUT_DIR --num-files 4 --docs-per-file 600 \\
        --seed 0 [--format jsonl|text|parquet] [--duplicate-fraction 0.02] \\
        [--bad-lines 6]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

GIRL_NAMES = (
    "Lily Mia Emma Sofia Ava Zoe Chloe Ella Grace Ruby Lucy Anna Sara Nora Ivy "
    "Maya Luna Rosa Daisy Molly Hannah Alice Clara Julia Leah Amy Kate Jane Eva "
    "Olivia Stella Hazel Violet Poppy Willow Hailey Bella Lola Nina Tina Rita "
    "Maria Elena Amelia Isla Freya Esme Iris Jade Pearl Holly Fern Rose June "
    "May Joy Hope Faith Tess Bea Dora Greta Heidi Ingrid Lena Mila Nadia Olga "
    "Paula Queenie Rachel Sadie Tara Uma Vera Wendy Xena Yara Zara Abby Beth "
    "Cora Dina Edie Fiona Gina Hattie Ida Josie Kira Lottie Millie Nell Opal "
    "Penny Sophie Tilly Ursula Winnie Aria Emily"
).split()

BOY_NAMES = (
    "Tom Ben Max Sam Leo Jack Tim Finn Noah Liam Owen Eli Jake Luke Adam Ethan "
    "Oscar Henry Hugo Felix Jasper Milo Theo Toby Ollie Charlie Harry Alfie "
    "Archie Billy Danny Eddie Freddie George Ivan Joey Kevin Larry Marco Nico "
    "Oliver Peter Quinn Ricky Simon Teddy Victor Walter Xavier Yusuf Zach Alex "
    "Bobby Carl David Ezra Frank Gabe Hank Isaac Jonah Kai Louis Mason Nate Omar "
    "Pablo Ralph Seth Tony Vince Wes Arlo Basil Caleb Dexter Elliot Gus Ian Jude "
    "Kit Lenny Matt Ned Otis Percy Rory Stan Troy Ulric Wyatt Ari Bruno Dylan Eric "
    "Fred Ray Ted"
).split()

ANIMALS = (
    "rabbit fox bear cat dog mouse owl duck frog pig cow horse sheep goat lamb "
    "puppy kitten bunny squirrel hedgehog badger deer turtle tortoise snail "
    "ladybug bee butterfly ant spider bird robin sparrow parrot penguin seal "
    "whale dolphin fish crab octopus lion tiger elephant giraffe zebra monkey "
    "panda koala kangaroo hippo rhino camel llama donkey chicken hen rooster "
    "goose swan crow raccoon otter beaver mole bat wolf dragon dinosaur unicorn "
    "pony ferret hamster gerbil lizard chipmunk moose skunk worm caterpillar"
).split()

OBJECTS = (
    "ball kite hat box book cup toy car boat balloon drum bell key ring shoe "
    "sock coat scarf blanket pillow teddy doll robot truck train plane rocket "
    "bucket shovel basket bag map compass flashlight lamp candle clock watch "
    "crayon pencil brush puzzle block marble shell stone rock feather leaf "
    "flower stick rope ladder wagon bike scooter sled swing slide tent jar bottle "
    "bowl spoon plate pot kettle broom mirror window door gate fence chair table "
    "bed rug umbrella jacket glove mitten button ribbon bow crown wand star "
    "necklace bracelet whistle flute guitar piano trumpet camera letter card "
    "picture painting drawing note gift present sticker badge coin treasure "
    "chest egg nest seed acorn pinecone snowball sandcastle"
).split()

FOODS = (
    "apple banana cookie cake pie sandwich carrot orange pear plum grape "
    "strawberry cherry muffin cupcake pancake waffle peach melon lemon pretzel "
    "biscuit donut lollipop berry potato tomato cucumber apricot kiwi mango "
    "coconut radish bean pea nut walnut cracker bun bagel tart pumpkin pizza "
    "cracker raisin"
).split()

PLACES = (
    "park garden forest beach lake river pond hill mountain meadow field farm "
    "barn zoo school library kitchen bedroom backyard playground market shop "
    "bakery castle cave island village town city street bridge tower "
    "lighthouse harbor jungle desert valley orchard greenhouse attic basement "
    "museum station circus fair treehouse swamp canyon waterfall"
).split()

ADJECTIVES = (
    "big small little tiny huge tall short long round soft hard warm cold cool "
    "bright dark shiny dull fluffy fuzzy smooth rough sticky wet dry clean dirty "
    "new old pretty funny silly strange odd lovely red blue green yellow orange "
    "purple pink brown black white gray golden silver striped spotted sparkly "
    "glittery magic special secret shiny wooden heavy light quiet noisy busy "
    "muddy sandy rocky grassy leafy tidy messy broken wobbly squeaky crunchy "
    "giant plain fancy cozy chilly frosty dusty rusty colorful beautiful "
    "wonderful sleepy bumpy fuzzy soft curly crooked straight narrow wide deep "
    "shallow hollow bouncy sunny shady quiet peaceful huge enormous mysterious"
).split()

THING_ADJECTIVES = (
    "red blue green yellow purple pink orange golden silver shiny sparkly "
    "striped spotted big little tiny old new soft fluffy magic special shiny "
    "round wooden plastic paper glass heavy light bright colorful squeaky"
).split()

FEELINGS = (
    "happy sad scared excited angry surprised proud worried curious sleepy "
    "glad nervous calm lonely bored grumpy cheerful hopeful shy brave thankful "
    "upset joyful confused silly tired jealous"
).split()

COLORS = "red blue yellow pink purple orange white golden".split()

CHAR_ADJECTIVES = (
    "little young small tiny kind happy brave clever curious shy silly friendly "
    "gentle cheerful playful sleepy grumpy busy lazy quiet noisy lonely lucky "
    "proud funny old wise fluffy careful careless bouncy jolly merry clumsy "
    "cheeky polite chatty dreamy fearless helpful smart sweet"
).split()

POSITIVE_ADJECTIVES = (
    "kind brave clever funny friendly cheerful gentle smart helpful curious "
    "playful happy polite caring honest patient strong quick"
).split()

TASTY_ADJECTIVES = "yummy tasty sweet good delicious crunchy juicy fresh soft warm".split()

GOOD_FEELINGS = "happy glad proud excited joyful thankful cheerful calm".split()
BAD_FEELINGS = "sad scared worried upset lonely nervous grumpy confused".split()

# (base form, past tense) activities.
ACTIVITIES = (
    ("play with blocks", "played with blocks"),
    ("draw pictures", "drew pictures"),
    ("sing songs", "sang songs"),
    ("dance in the rain", "danced in the rain"),
    ("jump in puddles", "jumped in puddles"),
    ("climb trees", "climbed trees"),
    ("read books", "read books"),
    ("bake cookies", "baked cookies"),
    ("plant flowers", "planted flowers"),
    ("fly a kite", "flew a kite"),
    ("build sandcastles", "built sandcastles"),
    ("ride a bike", "rode a bike"),
    ("swim in the lake", "swam in the lake"),
    ("look at the stars", "looked at the stars"),
    ("collect shells", "collected shells"),
    ("chase butterflies", "chased butterflies"),
    ("play hide and seek", "played hide and seek"),
    ("paint with bright colors", "painted with bright colors"),
    ("make mud pies", "made mud pies"),
    ("tell funny jokes", "told funny jokes"),
    ("play the drum", "played the drum"),
    ("run in the grass", "ran in the grass"),
    ("roll down the hill", "rolled down the hill"),
    ("feed the ducks", "fed the ducks"),
    ("pick berries", "picked berries"),
    ("splash in the water", "splashed in the water"),
    ("play tag", "played tag"),
    ("build a fort", "built a fort"),
    ("make paper boats", "made paper boats"),
    ("watch the clouds", "watched the clouds"),
    ("count the birds", "counted the birds"),
    ("play catch", "played catch"),
    ("skip rope", "skipped rope"),
    ("hum little tunes", "hummed little tunes"),
    ("dig in the sand", "dug in the sand"),
    ("make snowmen", "made snowmen"),
    ("help in the garden", "helped in the garden"),
    ("visit grandma", "visited grandma"),
    ("look for bugs", "looked for bugs"),
    ("do puzzles", "did puzzles"),
    ("blow bubbles", "blew bubbles"),
    ("play dress up", "played dress up"),
    ("sail toy boats", "sailed toy boats"),
    ("stack stones", "stacked stones"),
    ("whistle with friends", "whistled with friends"),
    ("hop like a frog", "hopped like a frog"),
    ("spin in circles", "spun in circles"),
    ("make funny faces", "made funny faces"),
    ("write little stories", "wrote little stories"),
    ("play on the swings", "played on the swings"),
)

# Simple past-tense movement / action verbs used in narration.
MOVE_VERBS = (
    "ran walked hopped skipped raced wandered marched tiptoed strolled dashed "
    "hurried jumped crawled rolled zoomed trotted waddled galloped"
).split()

SOUNDS = (
    "splash boom bang crash pop whoosh buzz ding thump crack swish "
    "plop squeak rumble tap clink"
).split()

EXCLAIMS = (
    "Wow!", "Oh no!", "Look!", "Hooray!", "Oh my!", "Yay!", "Hey!", "Oops!",
    "Uh oh!", "Hello!", "Oh!", "Yes!", "Wait!", "Hmm.", "Ah!", "Whee!",
)

TIMES = (
    "One day", "One morning", "One sunny morning", "One rainy afternoon",
    "One cold night", "One windy day", "Early one morning", "Last summer",
    "One snowy evening", "On a warm spring day", "One bright afternoon",
    "On a quiet Sunday", "One foggy morning", "After breakfast", "After lunch",
    "Before bedtime", "One chilly autumn day", "On a hot summer day",
)

WEATHER = (
    "the sun was shining", "it was raining softly", "the wind was blowing",
    "snow was falling", "the sky was blue", "big clouds filled the sky",
    "the air was warm", "the stars were out", "the moon was bright",
    "the grass was wet with dew", "the leaves were falling",
    "a rainbow was in the sky",
)

SAY_VERBS = (
    "said", "said", "said", "asked", "shouted", "whispered", "cried", "laughed",
    "replied", "called", "yelled", "smiled and said", "giggled",
)

LESSONS = (
    "sharing makes everyone happy",
    "it is good to be kind to others",
    "friends help each other",
    "being brave is not always easy, but it is worth it",
    "it is okay to ask for help",
    "telling the truth is important",
    "trying again can make things better",
    "being patient pays off",
    "small things can make a big difference",
    "listening to others is important",
    "everyone is good at something",
    "it is fun to try new things",
    "saying sorry can fix a lot",
    "working together makes hard jobs easy",
    "being careful keeps everyone safe",
    "a good friend is the best treasure",
)

RELATIVES = (
    "mom", "dad", "grandma", "grandpa", "big sister", "big brother", "aunt",
    "uncle", "teacher", "neighbor",
)

# ---------------------------------------------------------------------------
# Templates.  Fields:
#   story-level (fixed for one document):
#     {name} {kind} {He} {he} {his} {His} {him}
#     {friend} {fkind} {fHe} {fhe} {fhis} {fhim}
#     {place} {thing} {athing} {food} {rel} {lesson}
#   sentence-level (fresh per sentence, consistent inside it):
#     {adj} {adj2} {obj} {aobj} {animal} {aanimal} {place2} {food2} {feel}
#     {gfeel} {bfeel} {act} {acted} {move} {sound} {exclaim} {time}
#     {weather} {say} {num}
# ---------------------------------------------------------------------------

OPENINGS = (
    "Once upon a time, there was {akind_adj} named {name}.",
    "Once upon a time, in a {adj} little {place2}, there lived {akind} named {name}.",
    "There was once {akind_adj} called {name}.",
    "{name} was {akind_adj} who lived near the {place}.",
    "In a {adj} house by the {place}, there lived {akind} named {name}.",
    "Long ago, {akind_adj} named {name} lived in a {adj} {place2}.",
    "{name} the {kind} lived in a small house with {his} {rel}.",
    "Far away, in a {adj} {place2}, lived {akind} called {name}.",
    "Early one morning, {akind_adj} named {name} woke up with a big smile.",
    "This is a story about {akind} named {name}.",
)

INTRO = (
    "{He} loved to {act}.",
    "{He} liked to {act} every day.",
    "{His} favorite thing was to {act}.",
    "{He} had a {adj} {obj} that {he} took everywhere.",
    "{He} was very {padj} and liked to {act}.",
    "Every morning, {name} would {act} with {his} {rel}.",
    "{name} had a best friend, {afkind} named {friend}.",
    "{He} lived with {his} {rel} and a {cadj} {animal}.",
    "{name} was small, but {he} was very {padj}.",
    "Everyone in the {place} knew {name} because {he} was so {padj}.",
    "{His} {rel} always said that {he} was the most {padj} {kind} in the {place2}.",
    "{name} and {friend} liked to {act} together.",
)

# Episodes: small multi-sentence units.  Each is a tuple of sentence templates.
# Plot-specific episode lists are keyed by plot name.
PLOTS = {
    "lost": {
        "problem": (
            ("{time}, {name} could not find {his} {thing}.",
             "{He} looked under the bed and behind the door, but it was not there.",
             "{name} felt very {bfeel}."),
            ("{time}, {name} went to the {place} with {his} {thing}.",
             "{He} put it down to {act}, and when {he} came back, it was gone!",
             "\"{exclaim} Where is my {thing}?\" {name} {say}."),
            ("{name} had {athing}, and {he} loved it very much.",
             "{time}, the wind blew it far away.",
             "{name} was so {bfeel} that {he} began to cry."),
        ),
        "attempt": (
            ("{name} asked {friend} for help.",
             "\"Have you seen my {thing}?\" {he} asked.",
             "\"No, but I will help you look,\" said {friend}."),
            ("{name} and {friend} looked near the {place2}.",
             "They looked inside {aobj} and under a {adj} rock.",
             "They still could not find it."),
            ("{name} asked {aanimal} if it had seen the {thing}.",
             "The {animal} shook its head. \"Try the {place2},\" it said.",
             "So {name} {move} to the {place2}."),
            ("{name} looked high and low.",
             "{He} even looked in the {place2}, but the {thing} was not there.",
             "\"Do not give up,\" said {his} {rel}."),
        ),
        "resolution": (
            ("At last, {name} saw something {adj} behind a bush.",
             "It was {his} {thing}!",
             "\"{exclaim} I found it!\" {he} {say}. {He} felt so {gfeel}."),
            ("Then {friend} pointed at the tree. \"Look up there!\"",
             "The {thing} was stuck on a branch.",
             "{friend} helped {name} get it down, and they both laughed."),
            ("When {name} got home, {his} {rel} was smiling.",
             "The {thing} was sitting on the table!",
             "\"I found it by the door,\" said {his} {rel}. {name} gave {him_rel} a big hug."),
        ),
    },
    "friend": {
        "problem": (
            ("{time}, {name} went to the {place} to {act}.",
             "There {he} saw {afkind} sitting all alone.",
             "The {fkind} looked very {bfeel}."),
            ("{name} was new in the {place}.",
             "{He} did not know anyone, and {he} felt {bfeel}.",
             "{He} sat on a {adj} bench and looked at {his} shoes."),
            ("{time}, a new {fkind} came to the {place}.",
             "{fHe} was very shy and did not talk to anyone.",
             "{name} wanted to say hello, but {he} felt a little {bfeel}."),
        ),
        "attempt": (
            ("{name} walked up and said, \"Hello! My name is {name}. What is your name?\"",
             "\"I am {friend},\" said the {fkind} quietly.",
             "\"Do you want to {act} with me?\" asked {name}."),
            ("{name} shared {his} {food} with the {fkind}.",
             "\"Thank you,\" said {friend}. \"You are very kind.\"",
             "The {fkind} smiled for the first time."),
            ("{name} showed {friend} {his} {thing}.",
             "\"{exclaim} It is so {adj}!\" said {friend}.",
             "They played with it for a long time."),
        ),
        "resolution": (
            ("From that day on, {name} and {friend} were best friends.",
             "They would {act} together every day."),
            ("Soon {name} and {friend} were laughing and playing.",
             "{name} was not {bfeel} anymore. {He} had a new friend!"),
            ("When the sun went down, {friend} said, \"Can we play again tomorrow?\"",
             "\"Yes!\" said {name}. \"Let us meet at the {place} again.\""),
        ),
    },
    "trip": {
        "problem": (
            ("{time}, {name} and {his} {rel} went on a trip to the {place}.",
             "{name} was so {gfeel}. {He} had never been there before."),
            ("{time}, {name} packed a {adj} bag with {his} {thing} and some {foods}.",
             "\"We are going to the {place}!\" {he} told {friend}."),
            ("{name} wanted to see the {place} more than anything.",
             "{time}, {his} {rel} said, \"Today is the day. Let us go!\""),
        ),
        "attempt": (
            ("On the way, they saw {aanimal} and {aobj}.",
             "The {animal} was {cadj} and it said \"{sound}!\"",
             "{name} laughed and waved at it."),
            ("At the {place}, {name} saw many {adj} things.",
             "{He} saw {aobj}, {aanimal}, and a big {adj2} tree.",
             "\"{exclaim} Look at that!\" said {name}."),
            ("Then it started to rain.",
             "{name} and {his} {rel} hid under a {adj} tree.",
             "Soon the rain stopped, and the sun came out again."),
            ("They had a picnic with {foods} and {food2s}.",
             "Everything was very {tadj}.",
             "A little {animal} came to share the crumbs."),
        ),
        "resolution": (
            ("When it was time to go home, {name} felt {gfeel} and tired.",
             "{He} fell asleep in the car and dreamed about the {place}."),
            ("At home, {name} drew a picture of the {place}.",
             "{He} showed it to {friend} and told {fhim} all about the trip."),
            ("\"That was the best day ever,\" said {name}.",
             "{His} {rel} smiled. \"We can come back again soon.\""),
        ),
    },
    "cook": {
        "problem": (
            ("{time}, {name} wanted to make a {food} cake for {his} {rel}.",
             "{He} got a big bowl and a {adj} spoon."),
            ("{name} was very hungry.",
             "{He} went to the kitchen to make some {food} soup."),
            ("{time}, {name} decided to bake something special for {friend}.",
             "{He} put on {his} {adj} hat and got to work."),
        ),
        "attempt": (
            ("{He} mixed the flour, the milk, and the {foods}.",
             "Then {he} stirred and stirred.",
             "\"This will be so {adj}!\" {he} {say}."),
            ("Oops! {name} spilled the milk on the floor.",
             "{He} felt {bfeel}, but {he} cleaned it up and tried again."),
            ("{friend} came to help.",
             "{fHe} brought some {food2s} and a {adj} bowl.",
             "Together they made a big mess, and they laughed a lot."),
        ),
        "resolution": (
            ("At last, the food was ready.",
             "It smelled warm and sweet.",
             "Everyone said it was the best food they had ever tasted."),
            ("{name} gave the first piece to {his} {rel}.",
             "\"Mmm, it is so yummy!\" said {his} {rel}. {name} felt very {gfeel}."),
            ("They sat at the table and ate together.",
             "{name} was {gfeel} because {he} had made it all by {himself}."),
        ),
    },
    "brave_noise": {
        "problem": (
            ("{name} was scared of the dark.",
             "Every night, {he} thought there was a {adj} monster under the bed."),
            ("{time}, {name} heard a loud \"{sound}\" from the {place}.",
             "{He} was very scared. \"What was that?\" {he} whispered."),
            ("{time}, {name} saw a big shadow in the {place}.",
             "It had long ears and a {adj} tail.",
             "{name} hid behind {his} {rel}."),
        ),
        "attempt": (
            ("{name} took a deep breath.",
             "\"I can be brave,\" {he} said to {himself}.",
             "{He} took one small step, and then another."),
            ("{friend} held {name}'s hand.",
             "\"Do not worry. I am here with you,\" said {friend}.",
             "{name} felt a little better."),
            ("{His} {rel} gave {him} a little flashlight.",
             "\"Let us go and look together,\" said {his} {rel}.",
             "{name} held the flashlight tight."),
        ),
        "resolution": (
            ("It was only {aanimal}!",
             "The {animal} was {cadj} and friendly.",
             "{name} laughed. \"You are not scary at all!\""),
            ("There was no monster at all.",
             "It was just {aobj} that had fallen on the floor.",
             "{name} giggled and went back to sleep."),
            ("It was {aanimal} looking for its mom.",
             "{name} helped it find its way home.",
             "After that day, {name} was not afraid anymore."),
        ),
    },
    "brave_try": {
        "problem": (
            ("{name} wanted to swim in the lake, but {he} was afraid of the water.",
             "{He} stood at the edge and did not move."),
            ("There was a big {adj} hill near the {place}.",
             "All the other kids could climb it, but {name} was too scared to try."),
            ("{time}, {name} had to sing a song in front of the whole {place}.",
             "{His} knees were shaking, and {his} tummy felt funny."),
            ("{name} wanted to ride {his} new bike, but {he} was afraid to fall.",
             "{He} looked at the bike for a long time."),
        ),
        "attempt": (
            ("{name} took a deep breath.",
             "\"I can be brave,\" {he} said to {himself}.",
             "{He} took one small step, and then another."),
            ("{friend} held {name}'s hand.",
             "\"Do not worry. I am here with you,\" said {friend}.",
             "{name} felt a little better."),
            ("{His} {rel} gave {him} {athing}.",
             "\"This will help you be brave,\" said {his} {rel}.",
             "{name} held it tight."),
            ("The first time, {name} stopped and went back.",
             "{He} felt {bfeel}.",
             "\"Try again,\" said {friend}. \"You can do it!\""),
        ),
        "resolution": (
            ("{name} did it!",
             "{He} felt so {gfeel} and strong.",
             "\"I was scared, but I did it anyway,\" {he} said with a big smile."),
            ("After that day, {name} was not afraid anymore.",
             "{He} knew that {he} could be brave when {he} tried."),
            ("Everyone clapped and cheered for {name}.",
             "{His} {rel} gave {him} a big hug.",
             "\"I am so proud of you,\" said {his} {rel}."),
        ),
    },
    "share_toy": {
        "problem": (
            ("{name} had {athing}, and {he} did not want to share it.",
             "When {friend} asked to play with it, {name} said, \"No, it is mine!\""),
            ("{name} and {friend} both wanted the {thing}.",
             "They pulled and pulled, and they both got {bfeel}."),
            ("{time}, {name} got {athing} as a present.",
             "{friend} wanted to hold it, but {name} hid it behind {his} back."),
        ),
        "attempt": (
            ("{friend} walked away looking {bfeel}.",
             "{name} played alone, but it was not fun.",
             "{He} felt {bfeel} too."),
            ("{His} {rel} said, \"When we share, everyone can have fun.\"",
             "{name} thought about it for a long time."),
            ("Then the {thing} broke!",
             "\"{exclaim}\" cried {name}.",
             "{His} {rel} helped fix it, but {name} still felt bad."),
        ),
        "resolution": (
            ("{name} went to {friend} and said, \"I am sorry. Let us share.\"",
             "{friend} smiled, and they played together all day."),
            ("They took turns with the {thing}.",
             "It was much more fun to play together."),
            ("{name} gave the {thing} to {friend} for a while.",
             "{friend} was so {gfeel}, and so was {name}."),
        ),
    },
    "share_food": {
        "problem": (
            ("{time}, {name} got a big bag of {foods}.",
             "{He} wanted to eat them all by {himself}."),
            ("{name} had the last {food} in the basket.",
             "{friend} looked at it and said, \"I am so hungry.\""),
            ("{time}, {name} and {friend} found a {adj} tree full of {foods}.",
             "{name} wanted to keep them all."),
        ),
        "attempt": (
            ("{name} ate one {food}, then another, and then another.",
             "Soon {his} tummy hurt.",
             "\"Ouch,\" {he} said. \"That was too many.\""),
            ("{His} {rel} said, \"When we share, everyone can have fun.\"",
             "{name} thought about it for a long time."),
            ("{friend} sat down and looked {bfeel}.",
             "{name} saw that {friend} had nothing to eat."),
        ),
        "resolution": (
            ("{name} gave half of the {foods} to {friend}.",
             "\"Thank you!\" said {friend}. Sharing made them both {gfeel}."),
            ("{name} cut the {food} into two pieces.",
             "{He} gave one piece to {friend}, and they ate together."),
            ("{name} shared the {foods} with everyone in the {place}.",
             "Everyone was {gfeel}, and there were still some left."),
        ),
    },
    "rescue": {
        "problem": (
            ("{time}, {name} saw {aanimal} stuck in a {adj} {obj}.",
             "The poor {animal} could not get out.",
             "It looked {bfeel}."),
            ("{time}, {name} heard a little cry in the {place}.",
             "{aanimal_cap} was stuck up in a tall tree.",
             "It could not get down."),
            ("{time}, a big storm came to the {place}.",
             "The wind broke the {adj} fence, and a little {animal} was lost in the rain."),
        ),
        "attempt": (
            ("{name} wanted to help.",
             "{He} thought and thought.",
             "Then {he} had an idea!"),
            ("{name} got {aobj} and a long stick.",
             "{He} worked very hard.",
             "It was not easy, but {he} did not stop."),
            ("{name} called {friend}.",
             "\"Can you help me?\" {he} asked.",
             "\"Of course!\" said {friend}, and {fhe} came right away."),
        ),
        "resolution": (
            ("The {animal} was free!",
             "It jumped up and down and said \"{sound}!\"",
             "{name} smiled. Helping felt good."),
            ("At last, the {animal} was safe.",
             "\"Thank you, {name},\" said the {animal}.",
             "{name} felt warm and {gfeel} inside."),
            ("{name} took the {animal} home and gave it some water.",
             "The next day, the {animal} came back to visit with a {adj} {obj}.",
             "It was a thank you present!"),
        ),
    },
    "help": {
        "problem": (
            ("{His} {rel} was very tired after a long day.",
             "The house was messy, and there were {num} dirty plates in the sink."),
            ("{friend} fell down and hurt {fhis} knee.",
             "{fHe} started to cry."),
            ("{time}, an old {animal} could not carry its heavy bag.",
             "The bag was full of {objs}."),
        ),
        "attempt": (
            ("{name} wanted to help.",
             "{He} thought and thought.",
             "Then {he} had an idea!"),
            ("{name} worked very hard.",
             "{He} did not stop, even when {he} was tired."),
            ("{name} called {friend}.",
             "\"Can you help me?\" {he} asked.",
             "\"Of course!\" said {friend}, and {fhe} came right away."),
        ),
        "resolution": (
            ("At last, everything was fine again.",
             "\"Thank you, {name},\" everyone said.",
             "{name} felt warm and {gfeel} inside."),
            ("{His} {rel} gave {name} a big hug.",
             "\"You are such a good helper,\" {rel_he} said."),
            ("Soon everyone was smiling again.",
             "{name} learned that helping others feels very good."),
        ),
    },
    "fort": {
        "problem": (
            ("{name} and {friend} decided to build a fort in the {place}.",
             "They needed sticks, leaves, and a big {adj} sheet."),
            ("{time}, {name} wanted to build a {adj} fort in the {place}.",
             "{He} got some boxes, some tape, and a soft blanket."),
        ),
        "attempt": (
            ("The first time, it fell down with a \"{sound}\"!",
             "{name} felt {bfeel}.",
             "\"Let us try again,\" said {friend}."),
            ("They worked all morning.",
             "They stacked, pushed, and tied.",
             "It was hard work, but it was fun too."),
            ("{aanimal_cap} came to watch.",
             "\"What are you making?\" asked the {animal}.",
             "\"It is a secret fort!\" said {name}."),
        ),
        "resolution": (
            ("At last, the fort was done!",
             "It was the most wonderful fort {name} had ever seen.",
             "{He} was very {gfeel}."),
            ("They sat inside the fort and ate {foods}.",
             "It was the best fort in the whole {place}."),
            ("That night, {name} and {friend} slept in the fort.",
             "They looked at the stars through a little hole in the roof."),
        ),
    },
    "present": {
        "problem": (
            ("{name} wanted to make a present for {his} {rel}.",
             "{He} got paper, glue, and {num} {adj} buttons."),
            ("{time}, {name} remembered that it was {his} {rel}'s birthday.",
             "{He} had no present, so {he} decided to make one."),
        ),
        "attempt": (
            ("{He} worked all morning.",
             "{He} cut, glued, and painted.",
             "It was hard work, but it was fun too."),
            ("The glue got on {his} fingers and on {his} nose!",
             "{name} laughed and kept working."),
            ("{aanimal_cap} came to watch.",
             "\"What are you making?\" asked the {animal}.",
             "\"It is a surprise!\" said {name}."),
        ),
        "resolution": (
            ("At last, it was done!",
             "It was the most wonderful thing {name} had ever made.",
             "{He} gave it to {his} {rel}, and {rel_he} smiled."),
            ("{name} gave the present to {his} {rel}.",
             "\"I love it!\" said {his} {rel}, and {rel_he} put it on the shelf."),
            ("{His} {rel} opened the present and gasped.",
             "\"This is the best gift ever!\" {rel_he} said, and gave {name} a hug."),
        ),
    },
    "race": {
        "problem": (
            ("{time}, there was a big race in the {place}.",
             "{name} wanted to win more than anything."),
            ("{friend} said, \"I bet I can run faster than you!\"",
             "\"No way!\" said {name}. \"Let us race to the {place}!\""),
        ),
        "attempt": (
            ("Ready, set, go!",
             "{name} {move} as fast as {he} could.",
             "{friend} {move} right behind {him}."),
            ("Halfway there, {name} saw {aanimal} that had fallen down.",
             "{He} stopped to help it get up.",
             "Now everyone was ahead of {him}."),
            ("{name} tripped on a {adj} stone.",
             "{He} got up, brushed off {his} knees, and kept going."),
        ),
        "resolution": (
            ("{name} did not win the race, but {he} was not {bfeel}.",
             "{He} had tried {his} best and had fun.",
             "That was better than winning."),
            ("{name} crossed the line first!",
             "\"{exclaim} I won!\" {he} shouted.",
             "{He} shared {his} prize with {friend}."),
            ("They both reached the end at the same time.",
             "They fell on the grass and laughed and laughed."),
        ),
    },
    "outside": {
        "problem": (
            ("{time}, {name} looked out of the window and saw that {weather}.",
             "{He} wanted to go outside and {act}."),
            ("{time}, {name} was bored at home.",
             "\"Can I go outside?\" {he} asked {his} {rel}. \"Yes, but wear your coat,\" said {his} {rel}."),
        ),
        "attempt": (
            ("{name} put on {his} {adj} coat and {his} boots.",
             "{He} {move} outside with {friend}.",
             "Together they {acted} until their cheeks were pink."),
            ("In the {place}, they found a big puddle.",
             "{name} jumped in it. Splash!",
             "Now {his} boots were full of water, and {he} laughed."),
            ("They saw {num} {animals} playing near the {place}.",
             "{name} and {friend} played with them for a while."),
        ),
        "resolution": (
            ("When they came back inside, {his} {rel} made them warm {food} soup.",
             "It was a perfect day."),
            ("When the sun went down, {name} went home.",
             "{He} was tired, wet, and very {gfeel}."),
        ),
    },
    "birthday": {
        "problem": (
            ("It was {name}'s birthday!",
             "{He} was turning {num}, and {he} was very {gfeel}."),
            ("One morning, {name} woke up and remembered that it was {his} birthday.",
             "{He} jumped out of bed and {move} to the kitchen."),
        ),
        "attempt": (
            ("{His} friends came with presents.",
             "{friend} gave {him} {athing}.",
             "\"{exclaim} Thank you!\" said {name}."),
            ("{His} {rel} made a big {food} cake.",
             "It had {num} candles on top."),
            ("They played games in the {place}.",
             "{name} won one game, and {friend} won another."),
        ),
        "resolution": (
            ("They ate cake and sang songs.",
             "{name} blew out the candles and made a wish."),
            ("At the end of the day, {name} hugged everyone.",
             "\"This was my best birthday ever,\" {he} said."),
        ),
    },
    "garden": {
        "problem": (
            ("{time}, {name} found a tiny seed in the {place}.",
             "{He} decided to plant it in a {adj} pot."),
            ("{name}'s {rel} gave {him} a little bag of seeds.",
             "\"If you take care of them, they will grow,\" said {his} {rel}."),
        ),
        "attempt": (
            ("Every day, {name} gave the seed some water.",
             "{He} waited and waited.",
             "One morning, {he} saw a little green sprout!"),
            ("{aanimal_cap} came and tried to eat the sprout.",
             "\"No, no!\" said {name}. \"This is my plant.\"",
             "{He} gave the {animal} {afood} instead."),
            ("{name} sang to the plant every morning.",
             "{friend} thought it was silly, but {fhe} sang too."),
        ),
        "resolution": (
            ("Soon the sprout grew into a big {color} flower.",
             "{name} was so {gfeel}. {He} showed it to everyone in the {place}."),
            ("By summer, the plant was taller than {name}!",
             "It had {num} {color} flowers, and the bees loved it."),
        ),
    },
}
PLOT_NAMES = tuple(sorted(PLOTS))

# Side episodes: generic extra scenes that can appear in any story to vary the
# length.  Inserted between the problem and the resolution.
SIDE_EPISODES = (
    ("{name} saw {aanimal} near the {place2}.",
     "\"Hello, little {animal},\" said {name}.",
     "The {animal} said \"{sound}\" and ran away."),
    ("Then {name} stopped to eat {afood2}.",
     "It was very {tadj}.",
     "{He} saved a little piece for {friend}."),
    ("\"{exclaim} What is that?\" asked {friend}.",
     "\"I think it is {aobj},\" said {name}.",
     "They looked at it for a long time."),
    ("Outside, {weather}.",
     "{name} {move} to the window to look.",
     "{He} felt {feel}."),
    ("{name} began to sing a little song.",
     "\"La la la, the {obj} is {adj}, la la la!\"",
     "{friend} laughed and sang too."),
    ("On the way, they passed a {adj} {place2}.",
     "There were {num} {animals} playing there.",
     "One of them waved at {name}."),
    ("{name} was getting tired.",
     "{He} sat down under a tree to rest.",
     "A {cadj} {animal} sat down next to {him}."),
    ("\"Are you {bfeel}?\" asked {friend}.",
     "\"A little,\" said {name}. \"But I am okay.\"",
     "{friend} gave {name} a hug."),
    ("{name} found {aobj} on the ground.",
     "It was {adj} and a little {adj2}.",
     "{He} put it in {his} pocket."),
    ("They heard a \"{sound}\" from far away.",
     "\"What was that?\" asked {name}.",
     "\"Maybe it was {aanimal},\" said {friend}."),
    ("{name} remembered what {his} {rel} always said.",
     "\"Be kind, and be brave.\"",
     "{He} smiled and kept going."),
    ("{friend} told a funny joke about {aanimal} and {aobj}.",
     "{name} laughed so hard that {he} fell over."),
    ("The sky turned orange and pink.",
     "Birds were flying home to their nests.",
     "It was getting late."),
    ("{name} counted {num} {adj} {objs} on the way.",
     "\"One, two, three...\" {he} said.",
     "Counting was fun."),
    ("They stopped to {act}.",
     "{name} was very good at it.",
     "{friend} clapped {fhis} hands."),
    ("Suddenly, {aanimal} jumped out of a bush!",
     "\"{exclaim}\" cried {name}.",
     "But the {animal} only wanted to play."),
    ("{name} and {friend} played a game with {aobj}.",
     "They took turns, and nobody was {bfeel}."),
    ("\"I am hungry,\" said {friend}.",
     "\"Me too,\" said {name}.",
     "They shared {afood} and some {food2s}."),
)

ENDINGS = (
    "The end.",
    "And they all lived happily ever after.",
    "From that day on, {name} always remembered that {lesson}.",
    "{name} learned that {lesson}.",
    "That night, {name} went to bed with a big smile.",
    "It was a {dayadj} day, and {name} would never forget it.",
    "{name} was tired but very {gfeel}. {He} closed {his} eyes and fell asleep.",
    "And that is how {name} learned that {lesson}.",
    "{name} hugged {friend}. \"Thank you for being my friend,\" {he} said.",
    "The next day, {name} and {friend} went back to the {place} to {act}.",
)

NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "many")

MIN_CHARS = 200
MAX_CHARS = 2000

_PRONOUNS = {
    "he": {"He": "He", "he": "he", "his": "his", "His": "His", "him": "him", "himself": "himself"},
    "she": {"He": "She", "he": "she", "his": "her", "His": "Her", "him": "her", "himself": "herself"},
}
_FEMALE_RELS = {"mom", "grandma", "big sister", "aunt"}
_MALE_RELS = {"dad", "grandpa", "big brother", "uncle"}


def _article(word: str) -> str:
    w = word.lower()
    vowel = w[0] in "aeiou" and not w.startswith(("uni", "use", "one"))
    return ("an " if vowel else "a ") + word


_IRREGULAR_PLURALS = {
    "mouse": "mice", "sheep": "sheep", "fish": "fish", "goose": "geese",
    "deer": "deer", "moose": "moose", "wolf": "wolves", "leaf": "leaves",
    "potato": "potatoes", "tomato": "tomatoes", "mango": "mangoes",
    "child": "children",
}


def _plural(word: str) -> str:
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "ch", "sh", "z")):
        return word + "es"
    return word + "s"


def _plural_thing(phrase: str) -> str:
    head, _, last = phrase.rpartition(" ")
    return (head + " " if head else "") + _plural(last)


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


class _Slots(dict):
    """Mapping for str.format_map that draws missing episode-level slots lazily.

    A slot drawn once is cached, so repeated use inside one episode (a few
    consecutive sentences) agrees: "saw a fox ... The fox said ...".
    """

    __slots__ = ("rng",)

    def __missing__(self, key):
        rng = self.rng
        c = rng.choice
        if key == "adj" or key == "adj2":
            v = c(ADJECTIVES)
        elif key == "obj":
            v = c(OBJECTS)
        elif key == "aobj":
            v = _article(c(ADJECTIVES) + " " + c(OBJECTS)) if rng.random() < 0.5 else _article(c(OBJECTS))
        elif key == "dayadj":
            v = c(("wonderful", "lovely", "great", "special", "happy", "fun", "busy", "magical", "perfect", "long"))
        elif key == "color":
            v = c(COLORS)
        elif key == "cadj":
            v = c(CHAR_ADJECTIVES)
        elif key == "padj":
            v = c(POSITIVE_ADJECTIVES)
        elif key == "tadj":
            v = c(TASTY_ADJECTIVES)
        elif key == "objs":
            v = _plural(self["obj"])
        elif key == "food2s":
            v = _plural(self["food2"])
        elif key == "place2":
            v = c(PLACES)
        elif key == "food2":
            v = c(FOODS)
        elif key == "afood2":
            v = _article(self["food2"])
        elif key == "feel":
            v = c(FEELINGS)
        elif key == "gfeel":
            v = c(GOOD_FEELINGS)
        elif key == "bfeel":
            v = c(BAD_FEELINGS)
        elif key == "act" or key == "acted":
            a = c(ACTIVITIES)
            dict.__setitem__(self, "act", a[0])
            dict.__setitem__(self, "acted", a[1])
            return a[0] if key == "act" else a[1]
        elif key == "move":
            v = c(MOVE_VERBS)
        elif key == "sound":
            v = c(SOUNDS).capitalize()
        elif key == "exclaim":
            v = c(EXCLAIMS)
        elif key == "time":
            v = c(TIMES)
        elif key == "weather":
            v = c(WEATHER)
        elif key == "say":
            v = c(SAY_VERBS)
        elif key == "num":
            v = c(NUMBERS)
        elif key == "akind_adj":
            v = _article(c(CHAR_ADJECTIVES) + " " + self["kind"])
        else:
            raise KeyError(key)
        self[key] = v
        return v


def _make_character(rng: random.Random, human_prob: float = 0.5):
    gender = "she" if rng.random() < 0.5 else "he"
    name = rng.choice(GIRL_NAMES if gender == "she" else BOY_NAMES)
    if rng.random() < human_prob:
        kind = ("girl" if gender == "she" else "boy") if rng.random() < 0.8 else rng.choice(
            ("little girl", "kid", "child") if gender == "she" else ("little boy", "kid", "child"))
    else:
        kind = rng.choice(ANIMALS)
    return name, kind, gender


def _story_context(rng: random.Random) -> dict:
    name, kind, g = _make_character(rng)
    while True:
        friend, fkind, fg = _make_character(rng)
        if friend != name:
            break
    ctx = dict(_PRONOUNS[g])
    fp = _PRONOUNS[fg]
    rel = rng.choice(RELATIVES)
    if rel in _FEMALE_RELS:
        rel_he, him_rel = "she", "her"
    elif rel in _MALE_RELS:
        rel_he, him_rel = "he", "him"
    else:
        rel_he, him_rel = "they", "them"
    thing = rng.choice(THING_ADJECTIVES) + " " + rng.choice(OBJECTS)
    food = rng.choice(FOODS)
    animal = rng.choice(ANIMALS)
    ctx.update(
        animal=animal, aanimal=_article(animal), aanimal_cap=_article(animal).capitalize(),
        animals=_plural(animal), foods=_plural(food), afood=_article(food),
        name=name, kind=kind, akind=_article(kind),
        friend=friend, fkind=fkind, afkind=_article(fkind),
        fHe=fp["He"], fhe=fp["he"], fhis=fp["his"], fhim=fp["him"],
        place=rng.choice(PLACES), thing=thing, athing=_article(thing),
        food=food, rel=rel, rel_he=rel_he, him_rel=him_rel,
        lesson=rng.choice(LESSONS),
    )
    return ctx


def _render(rng: random.Random, ctx: dict, template: str, slots=None) -> str:
    if slots is None:
        slots = _Slots(ctx)
        slots.rng = rng
    s = template.format_map(slots)
    return s[0].upper() + s[1:] if s and s[0].islower() else s


def _render_episode(rng, ctx, episode) -> list[str]:
    slots = _Slots(ctx)
    slots.rng = rng
    return [_render(rng, ctx, t, slots) for t in episode]


def _generate_one(rng: random.Random) -> str:
    ctx = _story_context(rng)
    plot = PLOTS[rng.choice(PLOT_NAMES)]
    # Target length in characters; skewed towards shorter stories.
    target = int(MIN_CHARS + (MAX_CHARS - MIN_CHARS) * (rng.random() ** 1.6))

    opening = [_render(rng, ctx, rng.choice(OPENINGS))]
    for t in rng.sample(INTRO, rng.randint(0, 3)):
        opening.append(_render(rng, ctx, t))
    problem = _render_episode(rng, ctx, rng.choice(plot["problem"]))
    attempts = [_render_episode(rng, ctx, e)
                for e in rng.sample(plot["attempt"], rng.randint(1, min(2, len(plot["attempt"]))))]
    resolution = _render_episode(rng, ctx, rng.choice(plot["resolution"]))
    ending = [_render(rng, ctx, rng.choice(ENDINGS))]

    middle = [problem] + attempts
    paras = [opening] + middle + [resolution, ending]

    def total(ps):
        # sum of sentence lengths + separators (approximation of final join)
        return sum(len(s) + 1 for p in ps for s in p) + 2 * len(ps)

    length = total(paras)
    # Add side episodes (and occasionally extra attempts) until the target.
    side_pool = list(SIDE_EPISODES)
    rng.shuffle(side_pool)
    while length < target and side_pool:
        ep = _render_episode(rng, ctx, side_pool.pop())
        add = sum(len(s) + 1 for s in ep) + 2
        if length + add > MAX_CHARS - 10:
            break
        middle.append(ep)
        length += add
    # Drop trailing middle episodes if over the limit (very rare).
    while length > MAX_CHARS - 10 and len(middle) > 1:
        ep = middle.pop()
        length -= sum(len(s) + 1 for s in ep) + 2

    paras = [opening] + middle + [resolution]
    # The ending sometimes joins the resolution paragraph.
    if rng.random() < 0.5:
        paras[-1] = paras[-1] + ending
    else:
        paras.append(ending)
    # Occasionally merge adjacent short paragraphs so layout varies.
    merged = [paras[0]]
    for p in paras[1:]:
        if rng.random() < 0.3 and len(merged[-1]) + len(p) <= 6:
            merged[-1] = merged[-1] + p
        else:
            merged.append(p)
    text = "\n\n".join(" ".join(p) for p in merged)
    if len(text) > MAX_CHARS:  # hard guarantee
        cut = text.rfind(". ", 0, MAX_CHARS - 1)
        text = text[: cut + 1] if cut > MIN_CHARS else text[:MAX_CHARS]
    if len(text) < MIN_CHARS:  # pad with a side scene (rare)
        text += "\n\n" + " ".join(_render_episode(rng, ctx, rng.choice(SIDE_EPISODES)))
    return text


def generate_documents(num_docs: int, seed: int) -> list[str]:
    """Return ``num_docs`` distinct synthetic stories (200-2000 chars each).

    Deterministic: the same ``(num_docs, seed)`` always gives the same list, and
    the list for a smaller ``num_docs`` is a prefix of the list for a larger one.
    """
    rng = random.Random(seed)
    docs: list[str] = []
    seen: set[str] = set()
    while len(docs) < num_docs:
        d = _generate_one(rng)
        if d in seen:  # accidental exact duplicate: skip (very rare)
            continue
        seen.add(d)
        docs.append(d)
    return docs


# ---------------------------------------------------------------------------
# Writing files
# ---------------------------------------------------------------------------

_BAD_KINDS = ("invalid_json", "text_number", "missing_text", "invalid_utf8")


def _bad_line(kind: str, i: int) -> bytes:
    if kind == "invalid_json":
        return ('{"id": "bad-%05d", "text": "this line is not valid JSON' % i).encode()
    if kind == "text_number":
        return json.dumps({"id": "bad-%05d" % i, "text": 12345 + i}).encode()
    if kind == "missing_text":
        return json.dumps({"id": "bad-%05d" % i, "body": "This row has no text field."}).encode()
    if kind == "invalid_utf8":
        return b'{"id": "bad-%05d", "text": "broken bytes \xff\xfe\xc3\x28 here"}' % i
    raise ValueError(kind)


def _build_rows(num_files, docs_per_file, seed, duplicate_fraction, bad_lines):
    """Return per-file lists of rows: (id, text) tuples or raw bytes (bad lines)."""
    total = num_files * docs_per_file
    docs = generate_documents(total, seed)
    files: list[list] = []
    for f in range(num_files):
        files.append([("doc-%08d" % i, docs[i])
                      for i in range(f * docs_per_file, (f + 1) * docs_per_file)])

    # Separate RNG stream for placement so that document text does not depend
    # on the duplicate / bad-line options.
    prng = random.Random(f"placement-{seed}")
    n_dup = int(round(duplicate_fraction * total))
    if n_dup:
        if num_files < 2:
            print("warning: --duplicate-fraction with a single file: duplicates "
                  "are placed in the same file", file=sys.stderr)
        for src in sorted(prng.sample(range(total), min(n_dup, total))):
            src_file = src // docs_per_file
            others = [f for f in range(num_files) if f != src_file] or [src_file]
            dst = prng.choice(others)
            row = ("doc-%08d-dup" % src, docs[src])
            files[dst].insert(prng.randint(0, len(files[dst])), row)
    for i in range(bad_lines):
        dst = i % num_files if num_files else 0
        line = _bad_line(_BAD_KINDS[i % len(_BAD_KINDS)], i)
        files[dst].insert(prng.randint(0, len(files[dst])), line)
    return files, n_dup


def write_corpus(out_dir, num_files, docs_per_file, seed, fmt="jsonl",
                 duplicate_fraction=0.0, bad_lines=0):
    if fmt != "jsonl" and bad_lines:
        raise ValueError("--bad-lines is only supported with --format jsonl")
    if num_files < 1 or docs_per_file < 0:
        raise ValueError("--num-files must be >= 1 and --docs-per-file >= 0")
    if not 0.0 <= duplicate_fraction <= 1.0:
        raise ValueError("--duplicate-fraction must be in [0, 1]")
    os.makedirs(out_dir, exist_ok=True)
    files, n_dup = _build_rows(num_files, docs_per_file, seed, duplicate_fraction, bad_lines)
    ext = {"jsonl": "jsonl", "text": "txt", "parquet": "parquet"}[fmt]
    total_bytes = 0
    paths = []
    for f, rows in enumerate(files):
        path = os.path.join(out_dir, "part-%05d.%s" % (f, ext))
        if fmt == "jsonl":
            with open(path, "wb") as fh:
                for r in rows:
                    if isinstance(r, bytes):
                        fh.write(r + b"\n")
                    else:
                        fh.write(json.dumps({"id": r[0], "text": r[1]}, ensure_ascii=False).encode("utf-8") + b"\n")
        elif fmt == "text":
            with open(path, "w", encoding="utf-8", newline="\n") as fh:
                for _id, text in rows:
                    fh.write(" ".join(text.split()) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows]})
            pq.write_table(table, path)
        total_bytes += os.path.getsize(path)
        paths.append(path)
    return paths, num_files * docs_per_file, n_dup, total_bytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--num-files", type=int, default=4)
    p.add_argument("--docs-per-file", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("jsonl", "text", "parquet"), default="jsonl")
    p.add_argument("--duplicate-fraction", type=float, default=0.0,
                   help="share of documents re-emitted verbatim in another file")
    p.add_argument("--bad-lines", type=int, default=0,
                   help="number of malformed lines to insert (jsonl only)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        paths, n_docs, n_dup, nbytes = write_corpus(
            a.out_dir, a.num_files, a.docs_per_file, a.seed, a.format,
            a.duplicate_fraction, a.bad_lines)
    except ValueError as e:
        p.error(str(e))
    dt = time.perf_counter() - t0
    print(f"wrote {len(paths)} files, {n_docs} docs (+{n_dup} duplicates, "
          f"+{a.bad_lines} bad lines), {nbytes} bytes to {a.out_dir} "
          f"in {dt:.2f}s ({nbytes / 1e6 / max(dt, 1e-9):.1f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
